//! Checked access to guest-physical memory through the identity map.
//!
//! The entry code identity-maps `[0, 4 GiB)`, extended later to cover RAM. Every read of a structure
//! the VMM handed us goes through these helpers, which refuse address 0
//! and anything outside the map, so garbage pointers cannot fault.

use crate::entry::mapped_limit;

/// True if `[addr, addr + len)` is non-null and inside the identity map.
pub fn range_ok(addr: u64, len: u64) -> bool {
    addr != 0
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= mapped_limit())
}

fn ptr<T>(addr: u64) -> *const T {
    core::ptr::with_exposed_provenance(addr as usize)
}

fn ptr_mut<T>(addr: u64) -> *mut T {
    core::ptr::with_exposed_provenance_mut(addr as usize)
}

/// Reads a byte of guest memory, or `None` if it is not mapped.
pub fn read_u8(addr: u64) -> Option<u8> {
    range_ok(addr, 1).then(|| {
        // SAFETY: the byte is non-null and inside the identity map, so the
        // load cannot fault; volatile because the VMM owns this memory.
        unsafe { core::ptr::read_volatile(ptr::<u8>(addr)) }
    })
}

/// Reads a little-endian `u16` (any alignment), or `None` if unmapped.
pub fn read_u16(addr: u64) -> Option<u16> {
    range_ok(addr, 2).then(|| {
        // SAFETY: both bytes are non-null and inside the identity map;
        // `read_unaligned` has no alignment requirement.
        unsafe { core::ptr::read_unaligned(ptr::<u16>(addr)) }
    })
}

/// Reads a little-endian `u32` (any alignment), or `None` if unmapped.
pub fn read_u32(addr: u64) -> Option<u32> {
    range_ok(addr, 4).then(|| {
        // SAFETY: all bytes are non-null and inside the identity map;
        // `read_unaligned` has no alignment requirement.
        unsafe { core::ptr::read_unaligned(ptr::<u32>(addr)) }
    })
}

/// Reads a little-endian `u64` (any alignment), or `None` if unmapped.
pub fn read_u64(addr: u64) -> Option<u64> {
    range_ok(addr, 8).then(|| {
        // SAFETY: all bytes are non-null and inside the identity map;
        // `read_unaligned` has no alignment requirement.
        unsafe { core::ptr::read_unaligned(ptr::<u64>(addr)) }
    })
}

/// Sum of the bytes of `[addr, addr + len)` modulo 256 (ACPI/MP style
/// checksum), or `None` if the range is not mapped.
pub fn byte_sum(addr: u64, len: u64) -> Option<u8> {
    if !range_ok(addr, len) {
        return None;
    }
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(read_u8(addr + i)?);
    }
    Some(sum)
}

/// True if the bytes at `addr` equal `expected`.
pub fn bytes_eq(addr: u64, expected: &[u8]) -> bool {
    expected
        .iter()
        .enumerate()
        .all(|(i, &b)| read_u8(addr.wrapping_add(i as u64)) == Some(b))
}

/// Volatile aligned 64-bit load of RAM.
///
/// # Safety
/// `addr` must be 8-byte aligned, inside the identity map, and not memory
/// that Rust code currently holds references to.
pub unsafe fn read_volatile_u64(addr: u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(ptr::<u64>(addr)) }
}

/// Volatile aligned 64-bit store to RAM.
///
/// # Safety
/// As for [`read_volatile_u64`]; additionally the old contents must not be
/// needed by anyone (or be restored by the caller).
pub unsafe fn write_volatile_u64(addr: u64, value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(ptr_mut::<u64>(addr), value) }
}

/// Volatile aligned 32-bit MMIO load.
///
/// # Safety
/// `addr` must be 4-byte aligned, inside the identity map, and be device
/// memory (or RAM no Rust reference covers) whose read has no side effect
/// the caller is not prepared for.
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(ptr::<u32>(addr)) }
}

/// Volatile aligned 16-bit MMIO load.
///
/// # Safety
/// As for [`mmio_read32`], with 2-byte alignment.
pub unsafe fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(ptr::<u16>(addr)) }
}

/// Volatile 8-bit MMIO load.
///
/// # Safety
/// As for [`mmio_read32`] (no alignment requirement).
pub unsafe fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(ptr::<u8>(addr)) }
}

/// Volatile aligned 32-bit MMIO store.
///
/// # Safety
/// As for [`mmio_read32`], for a write.
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(ptr_mut::<u32>(addr), value) }
}

/// Volatile aligned 16-bit MMIO store.
///
/// # Safety
/// As for [`mmio_read32`], for a write with 2-byte alignment.
pub unsafe fn mmio_write16(addr: u64, value: u16) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(ptr_mut::<u16>(addr), value) }
}

/// Volatile 8-bit MMIO store.
///
/// # Safety
/// `addr` must be inside the identity map and be device memory (or RAM no
/// Rust reference covers).
pub unsafe fn mmio_write8(addr: u64, value: u8) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(ptr_mut::<u8>(addr), value) }
}

/// MMIO load of `width` bytes (1, 2, 4 or 8; anything else reads 8) at
/// any alignment, as one instruction (the VMM sees exactly this access,
/// unaligned ones included), zero-extended.
///
/// # Safety
/// `[addr, addr + width)` must be inside the identity map (or a mapped
/// device window) and be device memory whose read has no side effect the
/// caller is not prepared for.
pub unsafe fn mmio_load(addr: u64, width: u8) -> u64 {
    let value: u64;
    // SAFETY: guaranteed by the caller; the instruction only reads
    // `width` bytes at `addr`, and x86 allows any alignment.
    unsafe {
        match width {
            1 => {
                core::arch::asm!("movzx {v:e}, byte ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack, preserves_flags, readonly))
            }
            2 => {
                core::arch::asm!("movzx {v:e}, word ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack, preserves_flags, readonly))
            }
            4 => {
                core::arch::asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack, preserves_flags, readonly))
            }
            _ => {
                core::arch::asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack, preserves_flags, readonly))
            }
        }
    }
    value
}

/// MMIO store of the low `width` bytes (1, 2, 4 or 8; anything else
/// writes 8) of `value` at any alignment, as one instruction.
///
/// # Safety
/// As for [`mmio_load`], for a write.
pub unsafe fn mmio_store(addr: u64, width: u8, value: u64) {
    // SAFETY: guaranteed by the caller; the instruction only writes
    // `width` bytes at `addr`.
    unsafe {
        match width {
            1 => {
                core::arch::asm!("mov byte ptr [{a}], {v:l}", a = in(reg) addr, v = in(reg) value, options(nostack, preserves_flags))
            }
            2 => {
                core::arch::asm!("mov word ptr [{a}], {v:x}", a = in(reg) addr, v = in(reg) value, options(nostack, preserves_flags))
            }
            4 => {
                core::arch::asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) value, options(nostack, preserves_flags))
            }
            _ => {
                core::arch::asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) value, options(nostack, preserves_flags))
            }
        }
    }
}
