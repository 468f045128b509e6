//! x86 port I/O, the i8042 reset and the final halt loop.
//!
//! Every port access traps to the VMM, so callers keep them few.

use core::arch::asm;

/// i8042 keyboard controller command port.
const I8042_COMMAND: u16 = 0x64;
/// i8042 command: pulse the CPU reset line.
const I8042_RESET: u8 = 0xfe;

/// Reads a byte from an I/O port.
///
/// # Safety
/// Reading a port can have device side effects; the caller must know which
/// device sits at `port` and that reading it cannot corrupt memory.
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` only touches the I/O port (no memory, no stack); the
    // caller vouches for the device side effects.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Writes a byte to an I/O port.
///
/// # Safety
/// Writing a port can have device side effects (including DMA or reset);
/// the caller must know which device sits at `port`.
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` only touches the I/O port (no memory, no stack); the
    // caller vouches for the device side effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Reads a 16-bit word from an I/O port.
///
/// # Safety
/// As for [`inb`].
#[inline]
pub unsafe fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: `in` only touches the I/O port (no memory, no stack); the
    // caller vouches for the device side effects.
    unsafe {
        asm!("in ax, dx", out("ax") value, in("dx") port, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Reads a 32-bit word from an I/O port.
///
/// # Safety
/// As for [`inb`].
#[inline]
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: `in` only touches the I/O port (no memory, no stack); the
    // caller vouches for the device side effects.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Writes a 16-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
#[inline]
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: `out` only touches the I/O port (no memory, no stack); the
    // caller vouches for the device side effects.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags));
    }
}

/// Writes a 32-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
#[inline]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: `out` only touches the I/O port (no memory, no stack); the
    // caller vouches for the device side effects.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags));
    }
}

/// Resets the machine through the i8042 (`out 0x64, 0xfe`); if the VMM
/// ignores that, halts forever with interrupts disabled.
pub fn reset() -> ! {
    // SAFETY: port 0x64 is the i8042 command register; 0xfe requests a CPU
    // reset, which is exactly what we want here and touches no memory.
    unsafe { outb(I8042_COMMAND, I8042_RESET) };
    halt_forever()
}

/// Loops on `cli; hlt` forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: disabling interrupts and halting has no memory effects.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
