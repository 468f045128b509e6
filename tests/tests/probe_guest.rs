//! End-to-end boots of the probe guest under `tessera`: the CPU count and
//! memory the guest finds, both entry protocols, virtio-mmio discovery from
//! the command line, ticks, the boot timer and the exit on i8042 reset.

use std::time::Duration;

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;

use tessera_tests::{
    boot, guest_artifacts, probe_cmdline, tessera_command, RunOutput, Running, VmConfig,
};

const DEADLINE: Duration = Duration::from_secs(60);

fn boot_probe(vcpus: u8, mem_mib: usize, extra_cmdline: &str, args: &[&str]) -> RunOutput {
    let config = VmConfig::new(guest_artifacts().probe(), &probe_cmdline(extra_cmdline))
        .vcpus(vcpus)
        .mem_mib(mem_mib);
    boot(&config, args, DEADLINE)
}

/// Asserts the probe ran to the end, saw the configured machine, and that
/// tessera then exited with status 0 on the i8042 reset.
fn assert_probe_saw(run: &RunOutput, vcpus: u8, mem_mib: usize) {
    assert_eq!(run.code(), 0, "{}", run.describe());
    let report = run.probe_report();
    let get = |key: &str| {
        report
            .get(key)
            .unwrap_or_else(|| panic!("probe printed no {key}\n{}", run.describe()))
            .as_str()
    };
    assert_eq!(get("cpus"), vcpus.to_string(), "{}", run.describe());
    assert_eq!(get("mem_mib"), mem_mib.to_string(), "{}", run.describe());
    assert!(get("e820").starts_with("ok"), "{}", run.describe());
    assert_eq!(get("mem_check"), "ok", "{}", run.describe());
    assert!(report.contains_key("done"), "{}", run.describe());
    assert!(
        run.stderr.contains("i8042"),
        "tessera should log the i8042 reset\n{}",
        run.describe()
    );
    // Every vCPU leaves the guest before its memory goes: none re-enters
    // and faults on unmapped memory.
    assert!(!run.stderr.contains("KVM_RUN failed"), "{}", run.describe());
    for vcpu in 0..vcpus {
        assert!(
            run.stderr
                .contains(&format!("vCPU {vcpu} stopped: the VMM is ending")),
            "{}",
            run.describe()
        );
    }
}

#[test]
fn probe_sees_each_vcpu_count() {
    for vcpus in [1, 2, 4] {
        let run = boot_probe(vcpus, 128, "", &[]);
        assert_probe_saw(&run, vcpus, 128);
        assert_eq!(run.probe_report()["boot"], "pvh");
    }
}

#[test]
fn probe_sees_each_memory_size_including_above_the_mmio_hole() {
    for (mem_mib, e820_entries) in [(128, 3), (512, 3), (3584, 4)] {
        let run = boot_probe(1, mem_mib, "", &[]);
        assert_probe_saw(&run, 1, mem_mib);
        assert_eq!(
            run.probe_report()["e820"],
            format!("ok entries={e820_entries}"),
            "{}",
            run.describe()
        );
    }
}

#[test]
fn probe_boots_through_the_linux_64bit_entry_without_a_pvh_note() {
    let dir = tempfile::tempdir().unwrap();
    let mut elf = std::fs::read(guest_artifacts().probe()).unwrap();
    assert!(
        disable_note_segments(&mut elf) > 0,
        "the probe has a PT_NOTE"
    );
    let kernel = dir.path().join("probe-no-pvh.elf");
    std::fs::write(&kernel, elf).unwrap();

    let config = VmConfig::new(&kernel, &probe_cmdline(""))
        .vcpus(2)
        .mem_mib(256);
    let run = boot(&config, &[], DEADLINE);
    assert_probe_saw(&run, 2, 256);
    assert_eq!(run.probe_report()["boot"], "linux64", "{}", run.describe());
}

/// Turns every PT_NOTE program header of an ELF64 file into PT_NULL, so
/// that the loader finds no PVH entry note. Returns how many it changed.
fn disable_note_segments(elf: &mut [u8]) -> usize {
    const PT_NOTE: u32 = 4;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (entsize, count) = (u16_at(elf, 0x36), u16_at(elf, 0x38));
    let mut changed = 0;
    for i in 0..count {
        let at = phoff + i * entsize;
        if u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_NOTE {
            elf[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
            changed += 1;
        }
    }
    changed
}

#[test]
fn probe_finds_virtio_mmio_slots_named_on_the_command_line() {
    // No device backs these slots yet, so the probe must report each one,
    // in command-line order, with the magic value it read (0).
    let run = boot_probe(
        1,
        128,
        "virtio_mmio.device=4K@0xd0001000:5 virtio_mmio.device=0x1000@0xd0002000:6:1",
        &[],
    );
    assert_eq!(run.code(), 0, "{}", run.describe());
    let errors: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("probe.virtio_error="))
        .collect();
    assert_eq!(
        errors,
        ["0,bad-magic=0x0,0xd0001000", "1,bad-magic=0x0,0xd0002000"],
        "{}",
        run.describe()
    );
}

#[test]
fn probe_ticks_every_100ms_and_passes_its_command_line() {
    let run = boot_probe(1, 128, "probe.ticks=3 tessera.marker=xyz", &[]);
    assert_eq!(run.code(), 0, "{}", run.describe());
    let ticks: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("probe.tick="))
        .collect();
    assert_eq!(ticks, ["1", "2", "3"], "{}", run.describe());
    assert!(
        run.elapsed >= Duration::from_millis(300),
        "{:?}",
        run.elapsed
    );
    assert!(run.probe_report()["cmdline"].contains("tessera.marker=xyz"));
}

/// kvm-clock is the clock Firecracker and Cloud Hypervisor (which has no
/// PIT) give the probe too; the PIT stays the fallback.
#[test]
fn probe_keeps_time_with_kvmclock_and_with_the_pit() {
    for clock in ["kvmclock", "pit"] {
        let run = boot_probe(
            1,
            128,
            &format!("probe.verbose probe.clock={clock} probe.ticks=3"),
            &[],
        );
        assert_eq!(run.code(), 0, "{}", run.describe());
        assert_eq!(run.probe_report()["clock"], clock, "{}", run.describe());
        let ticks = run
            .stdout
            .lines()
            .filter(|l| l.starts_with("probe.tick="))
            .count();
        assert_eq!(ticks, 3, "{}", run.describe());
        assert!(
            run.elapsed >= Duration::from_millis(300),
            "{clock}: {:?}",
            run.elapsed
        );
    }
}

/// Each boot with `--boot-timer`: whether tessera logged `Guest-boot-time`.
fn boot_timer_fired(extra_cmdline: &str) -> (bool, RunOutput) {
    let run = boot_probe(1, 128, extra_cmdline, &["--boot-timer"]);
    assert_eq!(run.code(), 0, "{}", run.describe());
    (run.stderr.contains("Guest-boot-time = "), run)
}

#[test]
fn probe_boot_timer_moves_the_write_and_refuses_ram() {
    let (fired, run) = boot_timer_fired("probe.boot_timer=0xd0000000");
    assert!(fired, "{}", run.describe());
    // Firecracker 1.17's address: nothing of tessera's is there.
    let (fired, run) = boot_timer_fired("probe.boot_timer=0xc0000000");
    assert!(!fired, "{}", run.describe());
    assert!(
        run.probe_report().contains_key("done"),
        "{}",
        run.describe()
    );
    let (fired, run) = boot_timer_fired("probe.boot_timer=0x200000");
    assert!(!fired, "{}", run.describe());
    assert_eq!(
        run.probe_report()["boot_timer_error"],
        "bad-value,0x200000",
        "{}",
        run.describe()
    );
}

#[test]
fn boot_timer_logs_guest_boot_time() {
    let run = boot_probe(1, 128, "", &["--boot-timer"]);
    assert_eq!(run.code(), 0, "{}", run.describe());
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("Guest-boot-time = "))
        .unwrap_or_else(|| panic!("no Guest-boot-time line\n{}", run.describe()));
    let fields: Vec<&str> = line.split_whitespace().collect();
    let at = fields.iter().position(|f| *f == "Guest-boot-time").unwrap();
    let us: u64 = fields[at + 2].parse().unwrap();
    assert!(us > 0 && us < 60_000_000, "{line}");
    assert_eq!(fields[at + 3], "us");

    let without = boot_probe(1, 128, "", &[]);
    assert!(!without.stderr.contains("Guest-boot-time"));
}

#[test]
fn console_goes_to_the_serial_out_file() {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let run = boot_probe(1, 128, "", &["--serial-out", console.to_str().unwrap()]);
    assert_eq!(run.code(), 0, "{}", run.describe());
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains("probe.cpus=1\n") && text.contains("probe.done"),
        "{text}"
    );
    assert!(!run.stdout.contains("probe."), "{}", run.describe());
}

/// Opens a pseudo-terminal; returns (controller, terminal).
fn open_pty() -> (File, OwnedFd) {
    let (mut controller, mut terminal) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into the out-parameters;
    // the optional name, termios and window-size arguments are null.
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe {
        (
            File::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    }
}

#[test]
fn terminal_input_reaches_the_guest_uart() {
    let (mut controller, terminal) = open_pty();
    let dir = tempfile::tempdir().unwrap();
    let config = VmConfig::new(guest_artifacts().probe(), &probe_cmdline("probe.echo=5"));
    let mut vm = Running::spawn_with_stdin(
        tessera_command(&config, dir.path(), &[]),
        Stdio::from(terminal),
    );
    vm.wait_until(DEADLINE, |out, _| out.contains("probe.echo=waiting"));
    // The VMM put the terminal in raw mode before starting the guest, so
    // these bytes reach it without a newline and without being echoed.
    controller.write_all(b"hello").unwrap();
    vm.wait_until(DEADLINE, |_, _| false);
    let run = vm.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert_eq!(run.probe_report()["input"], "hello", "{}", run.describe());
}

/// The `kB` of `field` summed over the process's mappings.
fn smaps_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn guest_ram_without_backends_is_private_and_on_huge_pages() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !tessera_tests::can_run(
        thp.contains("[always]") || thp.contains("[madvise]"),
        "transparent huge pages are off on this host",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config =
        VmConfig::new(guest_artifacts().probe(), &probe_cmdline("probe.ticks=0")).mem_mib(256);
    let mut vm = Running::spawn(tessera_command(&config, dir.path(), &[]));
    vm.wait_until(DEADLINE, |out, _| out.contains("probe.tick=2"));
    let huge = smaps_kb(vm.pid(), "AnonHugePages:");
    let shared = smaps_kb(vm.pid(), "Shmem:");
    let run = vm.finish();
    assert!(huge >= 2048, "AnonHugePages {huge} kB\n{}", run.describe());
    assert!(
        shared < 2048,
        "Shmem {shared} kB: guest RAM is shared\n{}",
        run.describe()
    );
}
