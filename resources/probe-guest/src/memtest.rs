//! `probe.memtest=<MiB>`: fills that much free RAM (the top of the highest
//! RAM region below the MMIO hole) with a pattern derived from a seed; then
//! at every tick checks, on every 4 KiB page, the stamp word (the page's
//! first) the last tick wrote and one more word of the fill (its offset
//! moves by a word each tick, so every word is checked within 511 ticks),
//! and writes the new tick into every stamp. A snapshot taken at any point
//! and loaded later must keep it all intact. Each guest instruction may
//! be emulated (kvm_pvm), so a tick touches three words per page, not the
//! whole range.
//!
//! Output: `probe.memtest=filled,<MiB>,<base>` once, then per tick
//! `probe.memtest=ok,<tick>`, or `probe.memtest=bad,<addr>,<expected>,<found>`
//! (the first bad word) and no more checks. `probe.memtest_error=...` if
//! the size is unusable or no RAM is free.

use core::arch::x86_64::_rdtsc;

use crate::cmdline;
use crate::e820;
use crate::phys;
use crate::serial::{Bytes, outln};

/// Words per 4 KiB page.
const PAGE_WORDS: u64 = 512;

/// The memory under test and what it holds.
pub struct MemTest {
    base: u64,
    pages: u64,
    seed: u64,
    /// The tick each page's stamp holds (0: the fill).
    stamped: u64,
    failed: bool,
}

/// The word at `addr`: the fill's (`generation` 0) or a stamp's.
fn pattern(seed: u64, addr: u64, generation: u64) -> u64 {
    (addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed).rotate_left((generation % 64) as u32)
        ^ generation
}

impl MemTest {
    /// Parses `probe.memtest` and fills the memory; None if absent or
    /// unusable (said on the console).
    pub fn start(cmdline: &[u8], map: &e820::Map, image: (u64, u64)) -> Option<MemTest> {
        let value = cmdline::last_value(cmdline, "probe.memtest")?;
        let Some(mib) = value
            .and_then(|v| cmdline::kstrtouint(v, 0))
            .filter(|&m| m > 0)
        else {
            outln!(
                "probe.memtest_error=bad-value,{}",
                Bytes(value.unwrap_or(b""))
            );
            return None;
        };
        let len = u64::from(mib) << 20;
        let Some(base) = e820::free_top(map, image, len) else {
            outln!("probe.memtest_error=no-free-ram,{}", mib);
            return None;
        };
        // SAFETY: RDTSC has no preconditions; any value makes a seed.
        let seed = unsafe { _rdtsc() } | 1;
        let test = MemTest {
            base,
            pages: len / (PAGE_WORDS * 8),
            seed,
            stamped: 0,
            failed: false,
        };
        for word in 0..len / 8 {
            let addr = base + word * 8;
            test.store(addr, pattern(seed, addr, 0));
        }
        outln!("probe.memtest=filled,{},{:#x}", mib, base);
        Some(test)
    }

    /// The bytes under test (at the top of free RAM).
    pub fn len(&self) -> u64 {
        self.pages * PAGE_WORDS * 8
    }

    fn store(&self, addr: u64, value: u64) {
        // SAFETY: `addr` is an aligned word of [base, base + pages * 4 KiB),
        // free RAM inside the identity map (`e820::free_top`), outside the
        // probe image, so no Rust object lives there; this test owns it.
        unsafe { phys::write_volatile_u64(addr, value) }
    }

    fn load(&self, addr: u64) -> u64 {
        // SAFETY: as in `store`.
        unsafe { phys::read_volatile_u64(addr) }
    }

    /// Checks one word; false (and says so) if it is not `expected`.
    fn holds(&mut self, addr: u64, expected: u64) -> bool {
        let found = self.load(addr);
        if found != expected {
            outln!("probe.memtest=bad,{:#x},{:#x},{:#x}", addr, expected, found);
            self.failed = true;
        }
        !self.failed
    }

    /// Checks every page's stamp and this tick's fill word, then stamps
    /// every page with `tick`.
    pub fn step(&mut self, tick: u64) {
        if self.failed {
            return;
        }
        let offset = 1 + tick % (PAGE_WORDS - 1);
        for page in 0..self.pages {
            let stamp = self.base + page * PAGE_WORDS * 8;
            let word = stamp + offset * 8;
            if !self.holds(stamp, pattern(self.seed, stamp, self.stamped))
                || !self.holds(word, pattern(self.seed, word, 0))
            {
                return;
            }
        }
        for page in 0..self.pages {
            let stamp = self.base + page * PAGE_WORDS * 8;
            self.store(stamp, pattern(self.seed, stamp, tick));
        }
        self.stamped = tick;
        outln!("probe.memtest=ok,{}", tick);
    }
}
