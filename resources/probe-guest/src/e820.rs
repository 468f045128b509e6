//! The memory map: validation, RAM size and a non-destructive RAM check.
//!
//! Output lines: `probe.e820=ok entries=<n>` or `probe.e820=bad <reason>`,
//! `probe.mem_mib=<N>` and `probe.mem_check=ok|bad addr=0x..`.

use core::fmt;

use crate::entry::mapped_limit;
use crate::phys;
use crate::serial::outln;

/// At most this many entries are read (Linux's zero page holds 128).
pub const MAX_ENTRIES: usize = 128;
/// e820 type of usable RAM.
pub const TYPE_RAM: u32 = 1;
/// The MMIO hole no RAM may overlap.
pub const MMIO_HOLE: (u64, u64) = (0xd000_0000, 0x1_0000_0000);
/// Memory below this is never touched by the RAM check.
const LOW_MEMORY_END: u64 = 0x10_0000;

/// One memory map entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map as handed over by the VMM (at most [`MAX_ENTRIES`]).
pub struct Map {
    entries: [Entry; MAX_ENTRIES],
    len: usize,
    /// Number of entries the VMM claimed (may exceed `MAX_ENTRIES`).
    pub reported: u64,
}

impl Map {
    /// An empty map that the VMM claims has `reported` entries.
    pub const fn new(reported: u64) -> Map {
        Map {
            entries: [Entry {
                addr: 0,
                size: 0,
                kind: 0,
            }; MAX_ENTRIES],
            len: 0,
            reported,
        }
    }

    /// Appends an entry; ignored once [`MAX_ENTRIES`] are stored.
    pub fn push(&mut self, entry: Entry) {
        if let Some(slot) = self.entries.get_mut(self.len) {
            *slot = entry;
            self.len += 1;
        }
    }

    /// The stored entries.
    pub fn entries(&self) -> &[Entry] {
        &self.entries[..self.len]
    }
}

/// Why a memory map is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    NoEntries,
    TooMany {
        reported: u64,
    },
    Unreadable {
        read: usize,
        reported: u64,
    },
    Overflow {
        index: usize,
        addr: u64,
        size: u64,
    },
    Unsorted {
        index: usize,
        addr: u64,
        prev_addr: u64,
    },
    Overlap {
        index: usize,
        addr: u64,
        prev_end: u64,
    },
    RamInMmioHole {
        index: usize,
        addr: u64,
        size: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Problem::NoEntries => write!(f, "no-entries"),
            Problem::TooMany { reported } => {
                write!(f, "too-many entries={reported} max={MAX_ENTRIES}")
            }
            Problem::Unreadable { read, reported } => {
                write!(f, "unreadable entries={reported} read={read}")
            }
            Problem::Overflow { index, addr, size } => {
                write!(f, "overflow index={index} addr={addr:#x} size={size:#x}")
            }
            Problem::Unsorted {
                index,
                addr,
                prev_addr,
            } => write!(
                f,
                "unsorted index={index} addr={addr:#x} prev_addr={prev_addr:#x}"
            ),
            Problem::Overlap {
                index,
                addr,
                prev_end,
            } => write!(
                f,
                "overlap index={index} addr={addr:#x} prev_end={prev_end:#x}"
            ),
            Problem::RamInMmioHole { index, addr, size } => write!(
                f,
                "ram-in-mmio-hole index={index} addr={addr:#x} size={size:#x} hole={:#x}-{:#x}",
                MMIO_HOLE.0, MMIO_HOLE.1
            ),
        }
    }
}

/// Checks that the map is non-empty, sorted, non-overlapping and has no
/// RAM in the MMIO hole. Zero-size entries are skipped.
pub fn check(map: &Map) -> Result<(), Problem> {
    if map.reported > MAX_ENTRIES as u64 {
        return Err(Problem::TooMany {
            reported: map.reported,
        });
    }
    if (map.entries().len() as u64) < map.reported {
        return Err(Problem::Unreadable {
            read: map.entries().len(),
            reported: map.reported,
        });
    }
    if map.entries().iter().all(|e| e.size == 0) {
        return Err(Problem::NoEntries);
    }
    let mut prev: Option<(u64, u64)> = None;
    for (index, e) in map.entries().iter().enumerate() {
        if e.size == 0 {
            // Empty entries (e.g. qboot's terminator) are ignored, as
            // Linux's e820 sanitizer drops them.
            continue;
        }
        let Some(end) = e.addr.checked_add(e.size) else {
            return Err(Problem::Overflow {
                index,
                addr: e.addr,
                size: e.size,
            });
        };
        if let Some((prev_addr, prev_end)) = prev {
            if e.addr < prev_addr {
                return Err(Problem::Unsorted {
                    index,
                    addr: e.addr,
                    prev_addr,
                });
            }
            if e.addr < prev_end {
                return Err(Problem::Overlap {
                    index,
                    addr: e.addr,
                    prev_end,
                });
            }
        }
        if e.kind == TYPE_RAM && e.addr < MMIO_HOLE.1 && end > MMIO_HOLE.0 {
            return Err(Problem::RamInMmioHole {
                index,
                addr: e.addr,
                size: e.size,
            });
        }
        prev = Some((e.addr, end));
    }
    Ok(())
}

/// Total RAM in bytes (the sizes of all RAM entries).
pub fn ram_bytes(map: &Map) -> u64 {
    map.entries()
        .iter()
        .filter(|e| e.kind == TYPE_RAM)
        .fold(0u64, |sum, e| sum.saturating_add(e.size))
}

/// Total RAM rounded to the nearest MiB.
pub fn ram_mib(map: &Map) -> u64 {
    ram_bytes(map).saturating_add(0x7_ffff) >> 20
}

fn overlaps(a: u64, b: u64, range: (u64, u64)) -> bool {
    a < range.1 && b > range.0
}

/// First 8-byte-aligned word of `[lo, hi)` outside all `excluded` ranges.
fn first_word(lo: u64, hi: u64, excluded: &[(u64, u64)]) -> Option<u64> {
    let mut a = lo.checked_add(7)? & !7;
    'search: loop {
        let end = a.checked_add(8)?;
        if end > hi {
            return None;
        }
        for &range in excluded {
            if overlaps(a, end, range) {
                a = range.1.checked_add(7)? & !7;
                continue 'search;
            }
        }
        return Some(a);
    }
}

/// Last 8-byte-aligned word of `[lo, hi)` outside all `excluded` ranges.
fn last_word(lo: u64, hi: u64, excluded: &[(u64, u64)]) -> Option<u64> {
    let mut end = hi & !7;
    'search: loop {
        let a = end.checked_sub(8)?;
        if a < lo {
            return None;
        }
        for &range in excluded {
            if overlaps(a, end, range) {
                end = range.0 & !7;
                continue 'search;
            }
        }
        return Some(a);
    }
}

/// The highest `len` bytes of RAM (4 KiB-aligned) below the MMIO hole and
/// inside the identity map that leave out the first MiB and the probe
/// image (`image`): memory no one else uses.
pub fn free_top(map: &Map, image: (u64, u64), len: u64) -> Option<u64> {
    let limit = MMIO_HOLE.0.min(mapped_limit());
    map.entries()
        .iter()
        .filter(|e| e.kind == TYPE_RAM)
        .filter_map(|e| {
            let hi = e.addr.saturating_add(e.size).min(limit);
            let base = hi.checked_sub(len)? & !0xfff;
            let usable = base >= e.addr.max(LOW_MEMORY_END) && !overlaps(base, base + len, image);
            usable.then_some(base)
        })
        .max()
}

/// Test pattern for word `which` (0 first, 1 last) of RAM region `index`.
fn pattern(addr: u64, index: usize, which: u64) -> u64 {
    let p = 0x5a5a_c3c3_0000_0000 ^ ((index as u64) << 48) ^ addr;
    if which == 0 { p } else { !p }
}

/// Writes a distinct pattern to the first and last usable word of every
/// RAM region, reads them back and restores the old contents. Skips the
/// first MiB, the probe image (`image`), the MMIO hole and anything not
/// identity-mapped. Returns the first failing address.
pub fn check_ram(map: &Map, image: (u64, u64)) -> Result<(), u64> {
    let excluded = [
        (0, LOW_MEMORY_END),
        image,
        MMIO_HOLE,
        (mapped_limit(), u64::MAX),
    ];
    for (index, e) in map.entries().iter().enumerate() {
        if e.kind != TYPE_RAM {
            continue;
        }
        let hi = e.addr.saturating_add(e.size);
        let first = first_word(e.addr, hi, &excluded);
        let last = last_word(e.addr, hi, &excluded).filter(|&l| Some(l) != first);
        let words = [first.map(|a| (a, 0)), last.map(|a| (a, 1))];
        let mut saved = [0u64; 2];
        for (slot, &(addr, which)) in words.iter().flatten().enumerate() {
            // SAFETY: `addr` is 8-byte aligned, inside the identity map and
            // inside a RAM region; it avoids the probe image (so no Rust
            // object lives there) and the old value is restored below.
            unsafe {
                saved[slot] = phys::read_volatile_u64(addr);
                phys::write_volatile_u64(addr, pattern(addr, index, which));
            }
        }
        let mut failure = None;
        for (slot, &(addr, which)) in words.iter().flatten().enumerate() {
            // SAFETY: same words as above, still ours until restored.
            let got = unsafe { phys::read_volatile_u64(addr) };
            if got != pattern(addr, index, which) && failure.is_none() {
                failure = Some(addr);
            }
            // SAFETY: as above; puts the original contents back.
            unsafe { phys::write_volatile_u64(addr, saved[slot]) };
        }
        if let Some(addr) = failure {
            return Err(addr);
        }
    }
    Ok(())
}

/// Prints the `probe.e820`, `probe.mem_mib` and `probe.mem_check` lines
/// (and, if `verbose`, one `probe.e820_entry=<i>,<addr>,<size>,<type>` line
/// per entry first).
pub fn report(map: &Map, image: (u64, u64), verbose: bool) {
    if verbose {
        for (i, e) in map.entries().iter().enumerate() {
            outln!(
                "probe.e820_entry={},{:#x},{:#x},{}",
                i,
                e.addr,
                e.size,
                e.kind
            );
        }
    }
    match check(map) {
        Ok(()) => outln!("probe.e820=ok entries={}", map.entries().len()),
        Err(problem) => outln!("probe.e820=bad {}", problem),
    }
    outln!("probe.mem_mib={}", ram_mib(map));
    match check_ram(map, image) {
        Ok(()) => outln!("probe.mem_check=ok"),
        Err(addr) => outln!("probe.mem_check=bad addr={:#x}", addr),
    }
}
