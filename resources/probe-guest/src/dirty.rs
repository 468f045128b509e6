//! `probe.dirty=<MiB/s>`: while the probe ticks, it writes one word into
//! each 4 KiB page of a region of that many MiB, page after page, every
//! 10 ms a hundredth of it, so that about that many MiB of pages are
//! written each second, each page once a second: the load a live
//! migration's pre-copy rounds have to keep up with. The region is free
//! RAM just below the memory test's (`probe.memtest`), and nothing
//! checks what it holds.
//!
//! Output: `probe.dirty=on,<MiB/s>,<base>`, or `probe.dirty_error=...` if
//! the rate is unusable or there is not that much free RAM.

use crate::cmdline;
use crate::e820;
use crate::phys;
use crate::serial::{Bytes, outln};

const PAGE: u64 = 4096;
/// Slots of 10 ms per second.
const SLOTS_PER_SECOND: u64 = 100;

/// The region being written and where the writes are.
pub struct Dirtier {
    base: u64,
    pages: u64,
    next: u64,
    per_slot: u64,
    value: u64,
}

impl Dirtier {
    /// Parses `probe.dirty`; the region lies below the top `reserved`
    /// bytes of free RAM (the memory test's).
    pub fn start(
        cmdline: &[u8],
        map: &e820::Map,
        image: (u64, u64),
        reserved: u64,
    ) -> Option<Dirtier> {
        let value = cmdline::last_value(cmdline, "probe.dirty")?;
        let Some(mib) = value
            .and_then(|v| cmdline::kstrtouint(v, 0))
            .filter(|&m| m > 0)
        else {
            outln!(
                "probe.dirty_error=bad-value,{}",
                Bytes(value.unwrap_or(b""))
            );
            return None;
        };
        let len = u64::from(mib) << 20;
        let Some(base) = e820::free_top(map, image, len + reserved) else {
            outln!("probe.dirty_error=no-free-ram,{}", mib);
            return None;
        };
        let pages = len / PAGE;
        outln!("probe.dirty=on,{},{:#x}", mib, base);
        Some(Dirtier {
            base,
            pages,
            next: 0,
            per_slot: pages.div_ceil(SLOTS_PER_SECOND),
            value: 0,
        })
    }

    /// The bytes of the region (just below the memory test's).
    pub fn len(&self) -> u64 {
        self.pages * PAGE
    }

    /// One 10 ms slot's writes.
    pub fn step(&mut self) {
        self.value = self.value.wrapping_add(1);
        for _ in 0..self.per_slot {
            let addr = self.base + self.next * PAGE;
            // `addr` is a page of the region `e820::free_top` found.
            // SAFETY: free RAM inside the identity map, outside the probe
            // image and the memory test: no Rust object lives there.
            unsafe { phys::write_volatile_u64(addr, self.value) };
            self.next = (self.next + 1) % self.pages;
        }
    }
}
