//! A minimal IDT so that any CPU exception is reported on the serial port
//! (`probe.panic=exception ...`) followed by a reset, instead of a silent
//! triple fault. Interrupts stay disabled: only vectors 0-31 are set.

use core::arch::asm;
use core::cell::UnsafeCell;

use crate::entry;
use crate::serial::outln;

const VECTORS: usize = 32;
/// Code segment selector of our GDT.
const KERNEL_CS: u16 = 0x08;
/// Present, DPL 0, 64-bit interrupt gate.
const INTERRUPT_GATE: u8 = 0x8e;

#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const EMPTY: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        attributes: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn new(handler: u64) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist: 0,
            attributes: INTERRUPT_GATE,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[Gate; VECTORS]>);

// SAFETY: the probe runs on a single CPU with interrupts disabled; the table
// is written once in `install` before `lidt` and only read by the CPU after.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([Gate::EMPTY; VECTORS]));

#[repr(C, packed)]
struct DescriptorTablePointer {
    limit: u16,
    base: u64,
}

/// Fills the IDT with the exception stubs of `entry.rs` and loads it.
pub fn install() {
    let stubs = entry::exception_stubs();
    let table = IDT.0.get();
    for vector in 0..VECTORS {
        let handler = stubs + vector as u64 * entry::EXCEPTION_STUB_STRIDE;
        // SAFETY: single-threaded and before `lidt`, so nothing else reads
        // or writes the table; `vector` is in bounds.
        unsafe { (*table)[vector] = Gate::new(handler) };
    }
    let pointer = DescriptorTablePointer {
        limit: (core::mem::size_of::<[Gate; VECTORS]>() - 1) as u16,
        base: table as u64,
    };
    // SAFETY: `pointer` describes a static, fully initialised IDT whose
    // gates point at valid 64-bit stubs in our code segment.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}

/// Called by the exception stubs: reports the exception and resets.
#[unsafe(no_mangle)]
extern "C" fn probe_exception(vector: u64, error_code: u64, rip: u64) -> ! {
    outln!(
        "probe.panic=exception vector={} error={:#x} rip={:#x}",
        vector,
        error_code,
        rip
    );
    crate::io::reset()
}
