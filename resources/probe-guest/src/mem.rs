//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp` for the compiler.
//!
//! There is no libc. The copies and fills use `rep movsb`/`rep stosb` and
//! the comparisons use volatile loads, so the optimiser cannot recognise
//! them as calls to themselves.

use core::arch::asm;

/// C `memcpy`.
///
/// # Safety
/// `dst` and `src` must be valid for `n` bytes and must not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes;
    // `rep movsb` copies exactly `n` bytes forwards (DF is clear per ABI).
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dst
}

/// C `memmove`: like `memcpy` but the ranges may overlap.
///
/// # Safety
/// `dst` and `src` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if n == 0 {
        return dst;
    }
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: copying forwards is correct when dst is below src or the
        // ranges are disjoint; the caller guarantees validity.
        unsafe { memcpy(dst, src, n) };
    } else {
        // SAFETY: dst overlaps the tail of src, so copy backwards from the
        // last byte with DF set, and clear DF again as the ABI requires.
        // n > 0, so `n - 1` stays inside both ranges.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
    }
    dst
}

/// C `memset`.
///
/// # Safety
/// `dst` must be valid for `n` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dst` is valid for `n` bytes; `rep
    // stosb` stores exactly `n` copies of AL forwards.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dst
}

/// C `memcmp`.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes of reads.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees both ranges are valid;
        // volatile keeps the loop from being turned into a memcmp call.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// C `bcmp` (zero iff equal).
///
/// # Safety
/// As for [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Copies `src` to the start of `dst` (as many bytes as both hold) with
/// `rep movsq` and `rep movsb`: the compiler's `memcpy` is a `rep movsb`,
/// eight times the iterations, each one emulated under kvm_pvm.
pub fn copy(dst: &mut [u8], src: &[u8]) {
    let n = dst.len().min(src.len());
    // The direction flag is clear (Rust ABI): the string instructions copy
    // `n / 8` words, then `n % 8` bytes, upwards from the starts.
    // SAFETY: both slices are valid for `n` bytes and cannot overlap (one
    // is borrowed mutably).
    unsafe {
        core::arch::asm!(
            "rep movsq",
            "mov ecx, {tail:e}",
            "rep movsb",
            tail = in(reg) n & 7,
            inout("rcx") n / 8 => _,
            inout("rsi") src.as_ptr() => _,
            inout("rdi") dst.as_mut_ptr() => _,
            options(nostack, preserves_flags)
        )
    };
}
