//! Tessera probe guest: a tiny freestanding x86_64 guest that reports on
//! the serial port what the VMM gave it (boot protocol, command line,
//! memory map, CPUs, virtio-mmio and virtio-pci devices), optionally pings
//! another host (`probe.ping`), fetches MMDS data (`probe.mmds`) and ticks
//! with the PIT, pokes the boot timer and resets through the i8042.
//!
//! See README.md for the output lines and command line options.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod acpi;
mod bootinfo;
mod cmdline;
mod dirty;
mod e820;
mod entry;
mod hostile;
mod idt;
mod io;
mod keyboard;
mod kvmclock;
mod mem;
mod memtest;
mod mmds;
mod mptable;
mod msix;
mod netproto;
mod pci;
mod phys;
mod ping;
mod pit;
mod serial;
mod tcp;
mod timer;
mod virtio;
mod virtio_balloon;
mod virtio_blk;
mod virtio_net;
mod virtio_pci;
mod virtio_rng;
mod virtio_vsock;

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use bootinfo::BootInfo;
use serial::{Bytes, outln};

// Rebuild (and relink) when the linker script changes.
const _: &str = include_str!("../link.ld");

/// The VMM's boot-timer MMIO byte: writing 123 marks "guest booted"
/// (`probe.boot_timer=<addr>` moves it; Firecracker 1.17 has it at
/// 0xc000_0000).
const BOOT_TIMER_ADDR: u64 = 0xd000_0000;
const BOOT_TIMER_MAGIC: u8 = 123;
/// One tick is ten 10 ms PIT one-shots.
const ONESHOTS_PER_TICK: u32 = 10;

/// Rust entry, called by `entry.rs` with the boot kind and the physical
/// address of `hvm_start_info` (PVH) or `boot_params` (Linux 64-bit).
#[unsafe(no_mangle)]
pub extern "C" fn probe_main(kind: u32, info: u64) -> ! {
    serial::init();
    idt::install();

    let boot = BootInfo::collect(kind, info);
    outln!("probe.boot={}", boot.kind.name());
    if let Some(error) = boot.error {
        outln!("probe.bootinfo_error={}", error);
    }
    let cmdline = boot.cmdline();
    outln!("probe.cmdline={}", Bytes(cmdline));

    let verbose = cmdline::flag(cmdline, "probe.verbose");
    let image = entry::image_range();
    let ram_end = boot
        .e820
        .entries()
        .iter()
        .filter(|e| e.kind == e820::TYPE_RAM)
        .map(|e| e.addr.saturating_add(e.size))
        .max()
        .unwrap_or(0);
    entry::extend_identity_map(ram_end);
    e820::report(&boot.e820, image, verbose);
    mptable::report(verbose);
    if cmdline::flag(cmdline, "probe.cpuid") {
        report_cpuid();
    }
    let clock = timer::init(cmdline);
    if verbose {
        outln!("probe.clock={}", clock.name());
    }
    let boot_timer = boot_timer_addr(cmdline, &boot.e820, image);

    let virtio = probe_virtio(cmdline, &boot.e820, image, verbose);
    let mut net = virtio.net;
    ping(cmdline, net.as_mut());
    mmds(cmdline, net.as_mut(), verbose);
    let mut memtest = memtest::MemTest::start(cmdline, &boot.e820, image);
    let reserved = memtest.as_ref().map_or(0, memtest::MemTest::len);
    let mut dirtier = dirty::Dirtier::start(cmdline, &boot.e820, image, reserved);
    // The balloon's pool lies below the memory test's and dirtier's memory.
    let reserved = reserved + dirtier.as_ref().map_or(0, dirty::Dirtier::len);
    let mut balloon = virtio
        .balloon
        .and_then(|b| virtio_balloon::start(b.regs, b.mib, &boot.e820, image, reserved));
    let ticked = ticks(
        cmdline,
        net.as_mut(),
        memtest.as_mut(),
        dirtier.as_mut(),
        balloon.as_mut(),
    );
    if let Some(mut net) = net {
        if !ticked {
            serve_net(&mut net.device, net.serve_ms, balloon.as_mut());
        }
        net.device.finish();
    }
    echo(cmdline);

    if let Some(addr) = boot_timer {
        // SAFETY: `boot_timer_addr` checked that `addr` is inside the
        // identity map and neither RAM nor the probe: a device, or nothing.
        unsafe { phys::mmio_write8(addr, BOOT_TIMER_MAGIC) };
    }

    outln!("probe.done");
    io::reset()
}

/// The boot timer's address: `probe.boot_timer=<addr>` (base-0 number)
/// or [`BOOT_TIMER_ADDR`]. An address in RAM, in the probe or outside the
/// identity map is refused with `probe.boot_timer_error=bad-value,<value>`,
/// and then nothing is written.
fn boot_timer_addr(cmdline: &[u8], map: &e820::Map, image: (u64, u64)) -> Option<u64> {
    let Some(value) = cmdline::last_value(cmdline, "probe.boot_timer") else {
        return Some(BOOT_TIMER_ADDR);
    };
    let addr = value.and_then(|v| cmdline::kstrtoull(v, 0));
    let usable = addr.filter(|&a| {
        let in_ram = map
            .entries()
            .iter()
            .any(|e| e.kind == e820::TYPE_RAM && a >= e.addr && a - e.addr < e.size);
        a < entry::mapped_limit() && !in_ram && !(image.0..image.1).contains(&a)
    });
    if usable.is_none() {
        outln!(
            "probe.boot_timer_error=bad-value,{}",
            Bytes(value.unwrap_or(b""))
        );
    }
    usable
}

/// Subleaves listed per leaf: enough for the topology (0xb, 0x1f), cache
/// (4, 0x8000_001d) and extended-state (0xd) leaves of a small VM.
const CPUID_SUBLEAVES: u32 = 4;

/// `probe.cpuid`: one `probe.cpuid=<leaf>,<subleaf>,<eax>,<ebx>,<ecx>,<edx>`
/// line (hex) per basic, hypervisor and extended leaf the VMM reports, so
/// that two VMMs' CPUID can be compared line by line.
fn report_cpuid() {
    use core::arch::x86_64::__cpuid_count;
    for base in [0u32, 0x4000_0000, 0x8000_0000] {
        let max = __cpuid_count(base, 0).eax;
        if max < base || max - base > 0x40 {
            continue;
        }
        for leaf in base..=max {
            for subleaf in 0..CPUID_SUBLEAVES {
                let r = __cpuid_count(leaf, subleaf);
                outln!(
                    "probe.cpuid={:#x},{},{:#x},{:#x},{:#x},{:#x}",
                    leaf,
                    subleaf,
                    r.eax,
                    r.ebx,
                    r.ecx,
                    r.edx
                );
            }
        }
    }
}

/// What the virtio device drivers need to know.
struct VirtioContext<'a> {
    map: &'a e820::Map,
    image: (u64, u64),
    /// `probe.rng_bytes`: what to read from an entropy device.
    rng_bytes: u32,
    /// `probe.blk` options (`None`: block devices are only listed).
    blk: Option<virtio_blk::Options>,
    /// virtio-blk devices seen so far (the `<i>` of `probe.blk<i>`).
    blk_count: u32,
    /// `probe.net` options (`None`: network devices are only listed).
    net: Option<virtio_net::Options>,
    /// virtio-net devices seen so far (the `<i>` of `probe.net<i>`).
    net_count: u32,
    /// The network device being served (the first one, if it came up).
    net_device: Option<virtio_net::Net>,
    /// `probe.vsock` or `probe.vsock_connect` options (`None`: socket
    /// devices are only listed).
    vsock: Option<virtio_vsock::Options>,
    /// `probe.balloon` (MiB; `None`: balloon devices are only listed, and
    /// so are all but the first).
    balloon: Option<u32>,
    /// The balloon device to drive.
    balloon_device: Option<FoundBalloon>,
    verbose: bool,
}

/// What [`probe_virtio`] leaves to drive.
struct VirtioDevices {
    net: Option<ServedNet>,
    balloon: Option<FoundBalloon>,
}

/// A balloon device, driven (`virtio_balloon::start`) once the memory test
/// and the dirtier have their memory: its pool lies below theirs.
struct FoundBalloon {
    regs: virtio::Regs,
    /// `probe.balloon`: the pool size.
    mib: u32,
}

/// The network device served while the probe ticks.
struct ServedNet {
    device: virtio_net::Net,
    /// `probe.net_serve_ms`: how long to serve if the probe does not tick.
    serve_ms: u32,
}

impl VirtioContext<'_> {
    /// True if the register window at `base` overlaps RAM or the probe
    /// image: such a window is never driven (written).
    fn window_in_ram(&self, base: u64) -> bool {
        let end = base + virtio::WINDOW_SIZE;
        let in_ram = self.map.entries().iter().any(|e| {
            e.kind == e820::TYPE_RAM && base < e.addr.saturating_add(e.size) && end > e.addr
        });
        in_ram || (base < self.image.1 && end > self.image.0)
    }
}

/// Handles every `virtio_mmio.device=` parameter like Linux does.
/// Returns the network device to serve, if one came up, and the balloon
/// device to drive, if there is one.
fn probe_virtio(
    cmdline: &[u8],
    map: &e820::Map,
    image: (u64, u64),
    verbose: bool,
) -> VirtioDevices {
    let blk = virtio_blk::options(cmdline).unwrap_or_else(|bad| {
        outln!("probe.blk_error=bad-value,{}", bad);
        None
    });
    let net = virtio_net::options(cmdline).unwrap_or_else(|bad| {
        outln!("probe.net_error=bad-value,{}", bad);
        None
    });
    let vsock = virtio_vsock::options(cmdline).unwrap_or_else(|bad| {
        outln!("probe.vsock=error bad-value,{}", bad);
        None
    });
    let rng_bytes = virtio_rng::options(cmdline).unwrap_or_else(|bad| {
        outln!("probe.rng_error=bad-value,{}", bad);
        0
    });
    let balloon = virtio_balloon::options(cmdline).unwrap_or_else(|bad| {
        outln!(
            "probe.balloon_error=bad-value,{}",
            Bytes(bad.value.unwrap_or(b""))
        );
        None
    });
    let mut context = VirtioContext {
        map,
        image,
        rng_bytes,
        blk,
        blk_count: 0,
        net,
        net_count: 0,
        net_device: None,
        vsock,
        balloon,
        balloon_device: None,
        verbose,
    };
    // Linux's `vm_cmdline_id`: running platform device id.
    let mut next_id: i64 = 0;
    for (name, value) in cmdline::params(cmdline) {
        if !cmdline::param_eq(name, "virtio_mmio.device") {
            continue;
        }
        let Some(value) = value else {
            outln!("probe.virtio_error=bad-param,");
            continue;
        };
        let parsed = cmdline::parse_virtio_mmio_device(value);
        if let Some(id) = parsed.id {
            next_id = i64::from(id);
        }
        let Some(device) = parsed.device else {
            outln!("probe.virtio_error=bad-param,{}", Bytes(value));
            continue;
        };
        let index = next_id;
        next_id = i64::from((next_id as i32).wrapping_add(1));
        probe_virtio_device(index, device.base, &mut context);
    }
    probe_pci(cmdline, next_id, &mut context);
    let serve_ms = context.net.map_or(0, |o| o.serve_ms);
    VirtioDevices {
        net: context
            .net_device
            .map(|device| ServedNet { device, serve_ms }),
        balloon: context.balloon_device,
    }
}

fn probe_virtio_device(index: i64, base: u64, context: &mut VirtioContext<'_>) {
    if !virtio::Mmio::window_ok(base) {
        outln!("probe.virtio_error={},bad-base,{:#x}", index, base);
        return;
    }
    // SAFETY: the window is aligned and mapped (checked above). Reading
    // the identification registers is side-effect free on virtio-mmio and
    // harmless on RAM.
    let regs = unsafe { virtio::Mmio::new(base) };
    let magic = regs.magic();
    if magic != virtio::MAGIC {
        outln!(
            "probe.virtio_error={},bad-magic={:#x},{:#x}",
            index,
            magic,
            base
        );
        return;
    }
    let device_id = regs.device_id();
    outln!("probe.virtio={},{},{:#x}", index, device_id, base);
    let in_ram = context.window_in_ram(base);
    drive_virtio(index, virtio::Regs::Mmio(regs), device_id, in_ram, context);
}

/// Unless `pci=off`: enumerates PCI bus 0 (see `pci.rs`) and drives its
/// virtio functions like the virtio-mmio devices, with `probe.virtio=`
/// indices from `first_index` on. A function whose structures are
/// unusable gets `probe.pci_error=<bdf>,<reason>` and is not driven.
fn probe_pci(cmdline: &[u8], first_index: i64, context: &mut VirtioContext<'_>) {
    let Some(found) = pci::discover(cmdline, context.map, context.verbose) else {
        return;
    };
    let msix = cmdline::flag(cmdline, "probe.msix");
    let hostile = cmdline::flag(cmdline, "probe.pci_hostile");
    let mut index = first_index;
    for function in found.functions.iter() {
        let Some(device_id) = function.virtio_id() else {
            continue;
        };
        let this = index;
        index += 1;
        outln!("probe.virtio={},{},pci:{}", this, device_id, function.bdf);
        match virtio_pci::PciRegs::new(function, device_id, context.map) {
            Ok(mut regs) => {
                if hostile {
                    hostile::run(function, &regs);
                }
                // The entropy and block drivers run the check (see
                // `msix.rs`); the others complete requests on their own
                // terms.
                let checked = matches!(device_id, virtio_rng::DEVICE_ID | virtio_blk::DEVICE_ID);
                regs.msix_check = (msix && checked).then_some(this);
                drive_virtio(this, virtio::Regs::Pci(regs), device_id, false, context);
            }
            Err(e) => e.report(function.bdf),
        }
    }
}

/// Runs the driver of `device_id` on `regs` (`in_ram`: its registers
/// overlap RAM or the probe, so it is not driven).
fn drive_virtio(
    index: i64,
    regs: virtio::Regs,
    device_id: u32,
    in_ram: bool,
    context: &mut VirtioContext<'_>,
) {
    match device_id {
        virtio_rng::DEVICE_ID => {
            if in_ram {
                outln!("probe.virtio_rng={},error=base-in-ram", index);
                return;
            }
            virtio_rng::probe(index, regs, context.rng_bytes);
        }
        virtio_blk::DEVICE_ID => {
            let blk_index = context.blk_count;
            context.blk_count += 1;
            let Some(options) = context.blk else {
                return;
            };
            if in_ram {
                outln!("probe.blk{}=error setup base-in-ram", blk_index);
                return;
            }
            virtio_blk::probe(blk_index, regs, &options);
        }
        virtio_vsock::DEVICE_ID => {
            let Some(options) = context.vsock.take() else {
                return;
            };
            if in_ram {
                outln!("probe.vsock=error setup base-in-ram");
                return;
            }
            virtio_vsock::probe(regs, &options);
        }
        virtio_net::DEVICE_ID => {
            let net_index = context.net_count;
            context.net_count += 1;
            // Only the first network device is driven.
            let Some(options) = context.net.filter(|_| net_index == 0) else {
                return;
            };
            if in_ram {
                outln!("probe.net{}=error setup base-in-ram", net_index);
                return;
            }
            context.net_device = virtio_net::setup(net_index, regs, &options, context.verbose);
        }
        virtio_balloon::DEVICE_ID => {
            let Some(mib) = context.balloon.take() else {
                return;
            };
            if in_ram {
                outln!("probe.balloon=error setup base-in-ram");
                return;
            }
            context.balloon_device = Some(FoundBalloon { regs, mib });
        }
        _ => {}
    }
}

/// `probe.ping=<a.b.c.d>[:<count>]`: pings that address through the
/// served network device (see `ping.rs`).
fn ping(cmdline: &[u8], net: Option<&mut ServedNet>) {
    match ping::options(cmdline) {
        Ok(Some(options)) => ping::run(&options, net.map(|n| &mut n.device)),
        Ok(None) => {}
        Err(bad) => outln!("probe.ping_error=bad-value,{}", bad),
    }
}

/// `probe.mmds=<path>`: fetches that path from the MMDS through the served
/// network device (see `mmds.rs`).
fn mmds(cmdline: &[u8], net: Option<&mut ServedNet>, verbose: bool) {
    match mmds::options(cmdline) {
        Ok(Some(options)) => mmds::run(&options, net.map(|n| &mut n.device), verbose),
        Ok(None) => {}
        Err(bad) => outln!("probe.mmds_error=bad-value,{}", bad),
    }
}

/// `probe.ticks=<N>`: prints `probe.tick=<i>` every 100 ms, N times
/// (0 = forever), serving `net` meanwhile. Returns false if `probe.ticks`
/// is absent or unusable (the tick loop did not run).
/// Each tick also checks and rewrites `memtest`'s memory and polls the
/// balloon.
fn ticks(
    cmdline: &[u8],
    mut net: Option<&mut ServedNet>,
    mut memtest: Option<&mut memtest::MemTest>,
    mut dirtier: Option<&mut dirty::Dirtier>,
    mut balloon: Option<&mut virtio_balloon::Balloon>,
) -> bool {
    let Some(value) = cmdline::last_value(cmdline, "probe.ticks") else {
        return false;
    };
    let Some(count) = value.and_then(|v| cmdline::kstrtouint(v, 0)) else {
        outln!(
            "probe.ticks_error=bad-value,{}",
            Bytes(value.unwrap_or(b""))
        );
        return false;
    };
    let mut tick: u64 = 1;
    let mut keyboard = keyboard::CtrlAltDelWatch::new();
    while count == 0 || tick <= u64::from(count) {
        for _ in 0..ONESHOTS_PER_TICK {
            let slept = match net.as_deref_mut() {
                Some(net) => {
                    net.device.check_announce();
                    timer::sleep_10ms_polling(|| net.device.poll())
                }
                None => timer::sleep_10ms(),
            };
            if let Err(e) = slept {
                outln!("probe.pit_error={}", e.name());
                return true;
            }
            if let Some(dirtier) = dirtier.as_deref_mut() {
                dirtier.step();
            }
            if keyboard.poll() {
                outln!("probe.ctrl_alt_del");
                io::reset();
            }
        }
        outln!("probe.tick={}", tick);
        if let Some(test) = memtest.as_deref_mut() {
            test.step(tick);
        }
        if let Some(balloon) = balloon.as_deref_mut() {
            balloon.poll();
        }
        tick += 1;
    }
    true
}

/// Keyboard checks while serving without ticks: one every this many polls.
const SERVE_POLLS_PER_KEYBOARD_CHECK: u32 = 256;
/// While serving without ticks, the balloon is polled every this many
/// nanoseconds by kvm-clock (like a tick), or without kvm-clock at every
/// [`SERVE_CHECKS_PER_BALLOON_POLL`]th keyboard check.
const SERVE_BALLOON_POLL_NS: u64 = 100_000_000;
const SERVE_CHECKS_PER_BALLOON_POLL: u32 = 64;

/// When to poll the balloon while serving without ticks.
struct BalloonPace {
    next_ns: Option<u64>,
    checks: u32,
}

impl BalloonPace {
    fn new() -> BalloonPace {
        BalloonPace {
            next_ns: timer::now_ns(),
            checks: 0,
        }
    }

    /// Called at every keyboard check: true if the balloon is due.
    fn due(&mut self) -> bool {
        if let (Some(next), Some(now)) = (self.next_ns, timer::now_ns()) {
            if now < next {
                return false;
            }
            self.next_ns = Some(now.saturating_add(SERVE_BALLOON_POLL_NS));
            return true;
        }
        self.checks = self.checks.wrapping_add(1);
        self.checks.is_multiple_of(SERVE_CHECKS_PER_BALLOON_POLL)
    }
}

/// `probe.net_serve_ms=<n>` without `probe.ticks`: serves the network
/// device for about `ms` milliseconds, watching for Ctrl+Alt+Del and
/// polling the balloon.
fn serve_net(
    net: &mut virtio_net::Net,
    ms: u32,
    mut balloon: Option<&mut virtio_balloon::Balloon>,
) {
    if ms == 0 {
        return;
    }
    let mut deadline = virtio_net::serve_deadline(ms);
    let mut keyboard = keyboard::CtrlAltDelWatch::new();
    let mut pace = BalloonPace::new();
    let mut polls: u32 = 0;
    while !deadline.expired() {
        net.poll();
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(SERVE_POLLS_PER_KEYBOARD_CHECK) {
            net.check_announce();
            if keyboard.poll() {
                outln!("probe.ctrl_alt_del");
                io::reset();
            }
            if let Some(balloon) = balloon.as_deref_mut()
                && pace.due()
            {
                balloon.poll();
            }
        }
    }
}

/// How long `probe.echo` waits for its input, in 10 ms PIT one-shots.
const ECHO_TIMEOUT_ONESHOTS: u32 = 3000;

/// `probe.echo=<N>`: prints `probe.echo=waiting`, reads N bytes (at most
/// 64) from the serial port and prints them as `probe.input=<text>`. It gives
/// up after 30 s with `probe.input_error=timeout got=<n>`.
fn echo(cmdline: &[u8]) {
    let Some(value) = cmdline::last_value(cmdline, "probe.echo") else {
        return;
    };
    let Some(wanted) = value.and_then(|v| cmdline::kstrtouint(v, 0)) else {
        outln!(
            "probe.input_error=bad-value,{}",
            Bytes(value.unwrap_or(b""))
        );
        return;
    };
    let mut buf = [0u8; 64];
    let wanted = (wanted as usize).min(buf.len());
    let mut got = 0;
    let mut waited = 0;
    outln!("probe.echo=waiting");
    while got < wanted {
        if let Some(byte) = serial::try_read() {
            buf[got] = byte;
            got += 1;
            continue;
        }
        if waited == ECHO_TIMEOUT_ONESHOTS || timer::sleep_10ms().is_err() {
            outln!("probe.input_error=timeout got={}", got);
            return;
        }
        waited += 1;
    }
    outln!("probe.input={}", Bytes(&buf[..got]));
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::Relaxed) {
        match info.location() {
            Some(loc) => outln!(
                "probe.panic={} at {}:{}",
                info.message(),
                loc.file(),
                loc.line()
            ),
            None => outln!("probe.panic={}", info.message()),
        }
    }
    io::reset()
}
