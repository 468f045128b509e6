//! Output to COM1 (16550 UART at I/O port 0x3f8), one line at a time.
//!
//! Bytes go straight to the transmit holding register without polling the
//! line status register: emulated UARTs accept them immediately and every
//! port access traps, so skipping LSR halves the cost. Control bytes inside
//! a line are replaced by `?` so that each `outln!` is exactly one line.

use core::fmt::{self, Write};

use crate::io::{inb, outb};

const COM1: u16 = 0x3f8;
/// Line status register; bit 0 says a received byte is waiting.
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 0x01;
/// Line control register: 8 data bits, no parity, 1 stop bit, DLAB = 0.
const LCR: u16 = COM1 + 3;
const LCR_8N1: u8 = 0x03;

/// Makes sure the divisor latch is off so that writes reach THR.
pub fn init() {
    // SAFETY: 0x3fb is COM1's line control register; writing 8N1 with
    // DLAB clear only changes the UART framing, no memory is touched.
    unsafe { outb(LCR, LCR_8N1) };
}

fn put(byte: u8) {
    // SAFETY: 0x3f8 with DLAB clear is COM1's transmit holding register;
    // writing it only emits a byte.
    unsafe { outb(COM1, byte) };
}

/// Takes the next received byte, if one is waiting.
pub fn try_read() -> Option<u8> {
    // SAFETY: 0x3fd is COM1's line status register; reading it has no side
    // effect on memory.
    let ready = unsafe { inb(LSR) } & LSR_DATA_READY != 0;
    // SAFETY: with DLAB clear, 0x3f8 reads COM1's receive buffer register.
    ready.then(|| unsafe { inb(COM1) })
}

/// Writes bytes of a line, replacing control characters by `?`.
pub fn write_sanitized(bytes: &[u8]) {
    for &b in bytes {
        put(if b < 0x20 || b == 0x7f { b'?' } else { b });
    }
}

/// A `fmt::Write` sink for the current line.
struct LineWriter;

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_sanitized(s.as_bytes());
        Ok(())
    }
}

/// Prints one formatted line followed by `\n`.
pub fn print_line(args: fmt::Arguments<'_>) {
    // LineWriter never fails; a failing Display impl just truncates.
    let _ = LineWriter.write_fmt(args);
    put(b'\n');
}

/// Displays arbitrary bytes, showing invalid UTF-8 as `?`.
pub struct Bytes<'a>(pub &'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            f.write_str(chunk.valid())?;
            if !chunk.invalid().is_empty() {
                f.write_str("?")?;
            }
        }
        Ok(())
    }
}

/// `println!` for the serial console: `outln!("probe.x={}", v)`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::serial::print_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;
