//! `probe.pci_hostile`: odd configuration-space and BAR accesses on each
//! virtio-pci function before its driver runs, then checks that what
//! must not change did not. The driver's own lines that follow show
//! whether the device still works.
//!
//! The accesses (none of them leaves the device set up or enabled):
//!
//! * configuration space: every header byte and word read alone and
//!   compared with the dword reads; unaligned word and dword reads;
//!   writes to read-only fields (ids, class, header type, capability
//!   pointer, the first capability's body, the MSI-X table size); a
//!   phantom function (function 7 of a single-function device) read and
//!   written; with the ports, a data read while 0xcf8's enable bit is
//!   clear (must read all ones); with ECAM, extended space (0x100, 0xffc);
//! * BARs: a memory BAR written with stray low bits, moved to address 0
//!   (with decoding on) and, if 64-bit, its upper half alone moved; each
//!   time restored; unimplemented BARs written (must stay 0);
//! * in the BARs: wrong-size and unaligned accesses to the common
//!   structure, writes to its read-only fields (`device_feature`,
//!   `num_queues`, `config_generation`), an out-of-range `queue_select`
//!   (then `queue_size` must read 0 and `queue_enable` must not stick),
//!   accesses just past the structure; a read of the notify structure
//!   and a write at its end; ISR read and written; a write to device
//!   configuration offset 0 (read-only for net, block, balloon and vsock:
//!   restored if it stuck); MSI-X: 1- and 2-byte table accesses, an entry
//!   past the end of the table read and written, the PBA written.
//!
//! Afterwards: ids, class, header type and capabilities read the same,
//! the BARs size and read the same, the MSI-X entries hold what they
//! held, the PBA reads 0. Output: `probe.pci_hostile=ok <bdf>
//! accesses=<n>` or `probe.pci_hostile=broken <bdf> <what>=0x<value>...`.

use crate::pci::{self, Bar, BarKind, Bdf, Function, reg};
use crate::phys;
use crate::serial::outln;
use crate::virtio_pci::{PciRegs, common};

/// Findings kept (the first ones).
const MAX_FINDINGS: usize = 8;
/// MSI-X entries saved and compared at most.
const MAX_ENTRIES: u16 = 16;

struct Run {
    bdf: Bdf,
    findings: [(&'static str, u64); MAX_FINDINGS],
    count: usize,
    accesses: u32,
}

impl Run {
    fn found(&mut self, what: &'static str, value: u64) {
        if self.count < MAX_FINDINGS {
            self.findings[self.count] = (what, value);
        }
        self.count += 1;
    }

    fn cfg_read(&mut self, offset: u16, width: u8) -> u64 {
        self.accesses += 1;
        pci::raw_read(self.bdf, offset, width)
    }

    fn cfg_write(&mut self, offset: u16, width: u8, value: u64) {
        self.accesses += 1;
        pci::raw_write(self.bdf, offset, width, value)
    }

    /// A load from a function's BAR (`addr` from [`Window::at`]).
    fn load(&mut self, addr: u64, width: u8) -> u64 {
        self.accesses += 1;
        // SAFETY: `Window::at` only returns addresses whose `width`
        // bytes lie inside a memory BAR that `PciRegs::new` checked (not
        // RAM) and mapped.
        unsafe { phys::mmio_load(addr, width) }
    }

    fn store(&mut self, addr: u64, width: u8, value: u64) {
        self.accesses += 1;
        // SAFETY: as for `load`.
        unsafe { phys::mmio_store(addr, width, value) }
    }
}

/// A structure inside a checked, mapped BAR: addresses `base + offset`
/// are handed out only if the access stays inside the BAR.
#[derive(Clone, Copy)]
struct Window {
    base: u64,
    bar_end: u64,
}

impl Window {
    fn new(base: u64, bar: &Bar) -> Window {
        Window {
            base,
            bar_end: bar.addr + bar.size,
        }
    }

    fn at(&self, offset: u64, width: u8) -> Option<u64> {
        let addr = self.base.checked_add(offset)?;
        (self.base != 0 && addr + u64::from(width) <= self.bar_end).then_some(addr)
    }
}

/// The window of the structure at `base` that `cap_bar` holds.
fn window(function: &Function, bar: u8, base: u64) -> Window {
    let bar = function.bars.get(usize::from(bar)).copied().unwrap_or(Bar {
        kind: BarKind::None,
        addr: 0,
        size: 0,
        prefetchable: false,
    });
    Window::new(base, &bar)
}

/// Runs the accesses on `function` (whose structures `regs` describes)
/// and prints the result line.
pub fn run(function: &Function, regs: &PciRegs) {
    let mut run = Run {
        bdf: function.bdf,
        findings: [("", 0); MAX_FINDINGS],
        count: 0,
        accesses: 0,
    };
    config_space(&mut run, function);
    bars(&mut run, function);
    structures(&mut run, function, regs);
    msix(&mut run, function, regs);
    invariants(&mut run, function);
    if run.count == 0 {
        outln!(
            "probe.pci_hostile=ok {} accesses={}",
            function.bdf,
            run.accesses
        );
        return;
    }
    let shown = &run.findings[..run.count.min(MAX_FINDINGS)];
    outln!(
        "probe.pci_hostile=broken {}{}",
        function.bdf,
        Findings(shown)
    );
}

/// ` <what>=0x<value>` per finding.
struct Findings<'a>(&'a [(&'static str, u64)]);

impl core::fmt::Display for Findings<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (what, value) in self.0 {
            write!(f, " {what}={value:#x}")?;
        }
        Ok(())
    }
}

fn config_space(run: &mut Run, function: &Function) {
    let bdf = function.bdf;
    // Byte and word reads agree with dword reads (the BARs are left out:
    // reading them is harmless, but their value is checked below).
    for offset in (0u16..0x40).step_by(4) {
        if (reg::BAR0..reg::BAR0 + 24).contains(&offset) {
            continue;
        }
        let dword = run.cfg_read(offset, 4);
        for i in 0..4u16 {
            let byte = run.cfg_read(offset + i, 1);
            if byte != (dword >> (8 * i)) & 0xff {
                run.found("byte-read-mismatch", u64::from(offset + i));
            }
        }
        for i in [0u16, 2] {
            let word = run.cfg_read(offset + i, 2);
            if word != (dword >> (8 * i)) & 0xffff {
                run.found("word-read-mismatch", u64::from(offset + i));
            }
        }
    }
    // Unaligned reads: any value, but the VMM must survive them.
    for (offset, width) in [(1, 2), (3, 2), (2, 4), (0x3f, 4), (0xfe, 4)] {
        run.cfg_read(offset, width);
    }
    // Read-only fields.
    let ids = run.cfg_read(reg::VENDOR_ID, 4);
    run.cfg_write(reg::VENDOR_ID, 4, 0xdead_beef);
    run.cfg_write(reg::DEVICE_ID, 2, 0x1234);
    let now = run.cfg_read(reg::VENDOR_ID, 4);
    if now != ids {
        run.found("ids-written", now);
    }
    let class = run.cfg_read(reg::CLASS_REVISION, 4);
    run.cfg_write(reg::CLASS_REVISION + 3, 1, 0x12);
    run.cfg_write(reg::CLASS_REVISION, 4, 0);
    let now = run.cfg_read(reg::CLASS_REVISION, 4);
    if now != class {
        run.found("class-written", now);
    }
    let header = run.cfg_read(reg::HEADER_TYPE, 1);
    run.cfg_write(reg::HEADER_TYPE, 1, header ^ 0x7f);
    let caps = run.cfg_read(reg::CAPABILITIES, 1);
    run.cfg_write(reg::CAPABILITIES, 1, 0);
    if caps >= 0x40 {
        // The first capability's body (e.g. a virtio cap's offset field).
        run.cfg_write(caps as u16 + 8, 4, 0x1234_5670);
        run.cfg_write(caps as u16 + 4, 2, 0xffff);
    }
    if let Some(msix) = function.msix {
        let at = u16::from(msix.cap) + 2;
        let control = run.cfg_read(at, 2);
        // Table size is read-only (enable and mask stay clear).
        run.cfg_write(at, 2, (control ^ 0x7ff) & 0x7ff);
        let now = run.cfg_read(at, 2);
        if now & 0x7ff != control & 0x7ff {
            run.found("msix-table-size-written", now);
        }
        run.cfg_write(at, 2, control);
    }
    // A phantom function: reads all ones, and its writes reach nothing
    // (BAR 0 of the real function still reads its address, not the
    // size a write of all ones would make it return once).
    if function.header_type & 0x80 == 0 && function.bdf.func == 0 {
        let phantom = Bdf { func: 7, ..bdf };
        run.accesses += 3;
        pci::raw_write(phantom, reg::BAR0, 4, u64::from(u32::MAX));
        let vendor = pci::raw_read(phantom, reg::VENDOR_ID, 2);
        if vendor != 0xffff {
            run.found("phantom-function", vendor);
        }
        let bar = function.bars[0];
        if matches!(bar.kind, BarKind::Mem32 | BarKind::Mem64) {
            let now = run.cfg_read(reg::BAR0, 4);
            if now & 0xffff_fff0 != bar.addr & 0xffff_fff0 {
                run.found("phantom-write-reached-function", now);
            }
        }
    }
    if pci::uses_ecam() {
        for offset in [0x100u16, 0x200, 0xffc] {
            run.cfg_read(offset, 4);
            run.cfg_write(offset, 4, u64::from(u32::MAX));
        }
    } else {
        run.accesses += 1;
        let value = pci::disabled_data_read(bdf);
        if value != u32::MAX {
            run.found("cf8-disabled-read", u64::from(value));
        }
    }
}

fn bars(run: &mut Run, function: &Function) {
    let mut i = 0;
    while i < 6 {
        let bar = function.bars[i];
        let offset = reg::BAR0 + 4 * i as u16;
        match bar.kind {
            BarKind::Mem32 | BarKind::Mem64 => {
                // What the registers held at discovery (type bits are
                // read-only, but written back as they were).
                let wide = bar.kind == BarKind::Mem64 && i < 5;
                let flags = if wide { 4 } else { 0 } | if bar.prefetchable { 8 } else { 0 };
                let low = bar.addr & 0xffff_fff0 | flags;
                let high = if wide { bar.addr >> 32 } else { 0 };
                let now = run.cfg_read(offset, 4);
                if now != low {
                    run.found("bar-read-changed", now);
                }
                // Stray low address bits (inside the size): ignored.
                if bar.size > 0x10 {
                    run.cfg_write(offset, 4, low | 0x10);
                    run.cfg_read(offset, 4);
                    run.cfg_write(offset, 4, low);
                }
                // Moved to 0 (over RAM), with decoding on.
                run.cfg_write(offset, 4, low & 0xf);
                if wide {
                    run.cfg_write(offset + 4, 4, 0);
                }
                run.cfg_read(offset, 4);
                run.cfg_write(offset, 4, low);
                if wide {
                    run.cfg_write(offset + 4, 4, high);
                    // The upper half alone (a transient 64-bit state).
                    run.cfg_write(offset + 4, 4, (high + 1) & 0xffff_ffff);
                    run.cfg_read(offset, 4);
                    run.cfg_write(offset + 4, 4, high);
                }
                if run.cfg_read(offset, 4) != low || wide && run.cfg_read(offset + 4, 4) != high {
                    run.found("bar-not-restored", i as u64);
                }
                i += if wide { 2 } else { 1 };
            }
            BarKind::None => {
                run.cfg_write(offset, 4, 0x1234_5670);
                let value = run.cfg_read(offset, 4);
                if value != 0 {
                    run.found("unimplemented-bar-writable", value);
                }
                run.cfg_write(offset, 4, 0);
                i += 1;
            }
            BarKind::Io | BarKind::Upper => i += 1,
        }
    }
}

fn structures(run: &mut Run, function: &Function, regs: &PciRegs) {
    let layout = regs.layout();
    let caps = &function.virtio;
    let Some(common_cap) = caps.common else {
        return;
    };
    let c = window(function, common_cap.bar, layout.common);
    // Wrong sizes and unaligned accesses.
    for (offset, width) in [
        (0x04, 1),
        (0x04, 2),
        (0x02, 4),
        (0x20, 8),
        (0x13, 2),
        (0x35, 4),
    ] {
        if let Some(addr) = c.at(offset, width) {
            run.load(addr, width);
        }
    }
    // Read-only fields.
    let num_queues = regs.read16(common::NUM_QUEUES);
    regs.write32(common::DEVICE_FEATURE_SELECT, 0);
    let features = regs.read32(common::DEVICE_FEATURE);
    for (offset, width, value) in [
        (common::DEVICE_FEATURE, 4, 0),
        (common::NUM_QUEUES, 2, 0x55),
        (common::CONFIG_GENERATION, 1, 0x77),
        (common::DEVICE_FEATURE_SELECT, 2, 0),
    ] {
        if let Some(addr) = c.at(offset, width) {
            run.store(addr, width, value);
        }
    }
    if regs.read16(common::NUM_QUEUES) != num_queues {
        run.found(
            "num-queues-written",
            u64::from(regs.read16(common::NUM_QUEUES)),
        );
    }
    regs.write32(common::DEVICE_FEATURE_SELECT, 0);
    if regs.read32(common::DEVICE_FEATURE) != features {
        run.found(
            "device-feature-written",
            u64::from(regs.read32(common::DEVICE_FEATURE)),
        );
    }
    // A queue that does not exist: if the device takes the selection
    // (it may refuse it, keeping the old one), the queue's fields read 0
    // and writes to them do not stick.
    regs.write16(common::QUEUE_SELECT, 0xffff);
    run.accesses += 2;
    if regs.read16(common::QUEUE_SELECT) == 0xffff {
        for (offset, width, value) in [
            (common::QUEUE_SIZE, 2, 8),
            (common::QUEUE_DESC, 4, 0x1000),
            (common::QUEUE_ENABLE, 2, 1),
        ] {
            if let Some(addr) = c.at(offset, width) {
                run.store(addr, width, value);
            }
        }
        let size = regs.read16(common::QUEUE_SIZE);
        if size != 0 {
            run.found("queue-size-out-of-range", u64::from(size));
        }
        let enabled = regs.read16(common::QUEUE_ENABLE);
        if enabled != 0 {
            run.found("queue-enable-out-of-range", u64::from(enabled));
        }
    }
    regs.write16(common::QUEUE_SELECT, 0);
    // Just past the structure.
    let end = u64::from(common_cap.length);
    for offset in [end, end + 4, 0x100] {
        if let Some(addr) = c.at(offset, 4) {
            run.load(addr, 4);
            run.store(addr, 4, u64::from(u32::MAX));
        }
    }
    // Notify: a read, and a write at its end.
    if let Some(cap) = caps.notify {
        let n = window(function, cap.bar, layout.notify);
        if let Some(addr) = n.at(0, 2) {
            run.load(addr, 2);
        }
        let last = u64::from(layout.notify_len.saturating_sub(2));
        if let Some(addr) = n.at(last, 2) {
            run.store(addr, 2, 0x7fff);
        }
    }
    // ISR: read (clears it) and written.
    if let Some(cap) = caps.isr {
        let isr = window(function, cap.bar, layout.isr);
        if let Some(addr) = isr.at(0, 1) {
            run.load(addr, 1);
            run.store(addr, 1, 0xff);
        }
    }
    // Device configuration offset 0: read-only for these devices.
    if let Some(cap) = caps.device
        && matches!(regs.device_id, 1 | 2 | 5 | 19)
    {
        let d = window(function, cap.bar, layout.device);
        if layout.device_len >= 4
            && let Some(addr) = d.at(0, 4)
        {
            let before = run.load(addr, 4);
            run.store(addr, 4, !before & 0xffff_ffff);
            let after = run.load(addr, 4);
            if after != before {
                run.found("device-config-written", after);
                run.store(addr, 4, before);
            }
        }
        if let Some(addr) = d.at(u64::from(layout.device_len), 4) {
            run.load(addr, 4);
        }
    }
    // Leave the device reset.
    regs.write8(common::DEVICE_STATUS, 0);
    run.accesses += 1;
}

fn msix(run: &mut Run, function: &Function, regs: &PciRegs) {
    let (Ok(m), Some(cap)) = (regs.msix, function.msix) else {
        return;
    };
    let table = window(function, cap.table_bar, m.table);
    let saved_count = m.vectors.min(MAX_ENTRIES);
    let mut saved = [[0u64; 4]; MAX_ENTRIES as usize];
    for (e, entry) in saved.iter_mut().enumerate().take(usize::from(saved_count)) {
        for (w, word) in entry.iter_mut().enumerate() {
            if let Some(addr) = table.at(e as u64 * 16 + w as u64 * 4, 4) {
                *word = run.load(addr, 4);
            }
        }
    }
    // 1- and 2-byte accesses to entry 0, then its control restored.
    for (offset, width) in [(0, 1), (2, 2), (9, 1)] {
        if let Some(addr) = table.at(offset, width) {
            run.load(addr, width);
        }
    }
    if let Some(addr) = table.at(12, 1) {
        run.store(addr, 1, 0);
    }
    if let Some(addr) = table.at(12, 4) {
        run.store(addr, 4, saved[0][3]);
    }
    // An entry past the end of the table.
    let past = u64::from(m.vectors) * 16;
    for (offset, value) in [(0, 0xfee0_0000), (8, 0x30), (12, 0)] {
        if let Some(addr) = table.at(past + offset, 4) {
            run.store(addr, 4, value);
        }
    }
    if let Some(addr) = table.at(past, 8) {
        run.load(addr, 8);
    }
    for (e, entry) in saved.iter().enumerate().take(usize::from(saved_count)) {
        for (w, &word) in entry.iter().enumerate() {
            if let Some(addr) = table.at(e as u64 * 16 + w as u64 * 4, 4)
                && run.load(addr, 4) != word
            {
                run.found("msix-entry-changed", e as u64 * 16 + w as u64 * 4);
            }
        }
    }
    // The PBA is read-only (and nothing is pending on a reset device).
    let pba = window(function, cap.pba_bar, m.pba);
    if let Some(addr) = pba.at(0, 4) {
        run.store(addr, 4, u64::from(u32::MAX));
        let value = run.load(addr, 4);
        if value != 0 {
            run.found("pba-written", value);
        }
    }
}

fn invariants(run: &mut Run, function: &Function) {
    let bdf = function.bdf;
    let ids = pci::read32(bdf, reg::VENDOR_ID);
    if ids != u32::from(function.vendor) | u32::from(function.device) << 16 {
        run.found("ids-changed", u64::from(ids));
    }
    if pci::read8(bdf, reg::HEADER_TYPE) != function.header_type {
        run.found(
            "header-type-changed",
            u64::from(pci::read8(bdf, reg::HEADER_TYPE)),
        );
    }
    let again = pci::reread_caps(function);
    if again.virtio != function.virtio || again.msix != function.msix {
        run.found("caps-changed", 0);
    }
    let bars = pci::resize_bars(function);
    for (i, (now, was)) in bars.iter().zip(function.bars.iter()).enumerate() {
        if now.kind != was.kind || now.addr != was.addr || now.size != was.size {
            run.found("bar-changed", i as u64);
        }
    }
    run.accesses += 8;
}
