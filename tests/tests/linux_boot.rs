//! Linux under `tessera`, in both kernel formats: the ELF vmlinux through
//! its PVH entry and the bzImage through the 64-bit boot protocol.
//!
//! On this project's test hosts KVM is kvm_pvm, which runs Linux about 100x
//! slow and cannot emulate some of its instructions, so these tests check the
//! early-boot milestones printed through `earlyprintk`: the banner, the e820
//! map, the CPU count and the memory size. Where the host has hardware
//! virtualization, they also wait for the rootfs init's `TESSERA-GUEST-UP`
//! and check `nproc` and `MemTotal` from inside the guest.

use std::path::Path;
use std::time::Duration;

use tessera_tests::{
    guest_artifacts, host_has_hardware_virtualization, run_with_deadline, tessera_command,
    RunOutput, VmConfig,
};

const VCPUS: u8 = 2;
const MEM_MIB: u64 = 256;
const EARLY_BOOT_DEADLINE: Duration = Duration::from_secs(240);
const FULL_BOOT_DEADLINE: Duration = Duration::from_secs(60);

const EARLY_ARGS: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 pci=off nomodule";

fn early_boot_done(stdout: &str) -> bool {
    stdout.contains(" available (") || stdout.contains("Kernel panic")
}

fn boot_linux(kernel: &Path, until_userspace: bool) -> RunOutput {
    let dir = tempfile::tempdir().unwrap();
    let args = if until_userspace {
        format!("{EARLY_ARGS} tessera.halt=1")
    } else {
        EARLY_ARGS.to_string()
    };
    let config = VmConfig::new(kernel, &args)
        .vcpus(VCPUS)
        .mem_mib(MEM_MIB as usize)
        .initrd(guest_artifacts().initramfs());
    let command = tessera_command(&config, dir.path(), &[]);
    if until_userspace {
        run_with_deadline(command, FULL_BOOT_DEADLINE, |_, _| false)
    } else {
        run_with_deadline(command, EARLY_BOOT_DEADLINE, |out, _| early_boot_done(out))
    }
}

/// The e820 map the VMM promises for MEM_MIB, as Linux prints it.
fn expected_e820() -> Vec<String> {
    let end = (MEM_MIB << 20) - 1;
    vec![
        "[mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        "[mem 0x000000000009fc00-0x00000000000fffff] reserved".to_string(),
        format!("[mem 0x0000000000100000-0x{end:016x}] usable"),
    ]
}

fn assert_early_boot(run: &RunOutput) {
    let out = &run.stdout;
    assert!(
        out.contains("Linux version 6.1"),
        "no banner\n{}",
        run.describe()
    );

    let e820: Vec<String> = out
        .lines()
        .filter_map(|l| {
            l.split_once("BIOS-e820: ")
                .map(|(_, rest)| rest.trim().to_string())
        })
        .collect();
    // earlyprintk and the console may both print the map: compare the first copy.
    assert!(e820.len() >= 3, "no e820 map\n{}", run.describe());
    assert_eq!(e820[..3], expected_e820()[..], "{}", run.describe());

    assert!(
        out.contains(&format!("Allowing {VCPUS} CPUs, 0 hotplug CPUs")),
        "CPU count\n{}",
        run.describe()
    );

    let memory_line = out
        .lines()
        .find(|l| l.contains("Memory: ") && l.contains(" available"))
        .unwrap_or_else(|| panic!("no Memory: line\n{}", run.describe()));
    let total_kib: u64 = memory_line
        .split_once('/')
        .and_then(|(_, rest)| rest.split_once('K'))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable {memory_line:?}"));
    let mem_kib = MEM_MIB << 10;
    // Linux counts all e820 RAM: the configured size less the legacy BIOS area.
    assert!(
        (mem_kib - 1024..=mem_kib).contains(&total_kib),
        "{memory_line:?} does not match {MEM_MIB} MiB"
    );
}

fn assert_userspace(run: &RunOutput) {
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert!(
        run.stdout.contains("TESSERA-GUEST-UP"),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains(&format!("tessera.nproc={VCPUS}")),
        "{}",
        run.describe()
    );
    let memtotal: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("tessera.memtotal_kb="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no memtotal\n{}", run.describe()));
    let mem_kib = MEM_MIB << 10;
    assert!(
        memtotal > mem_kib * 8 / 10 && memtotal <= mem_kib,
        "MemTotal {memtotal} kB for {MEM_MIB} MiB"
    );
}

/// The userspace tests are ignored by default: they need a KVM that runs
/// guest code natively (vmx or svm in /proc/cpuinfo). Run them with
/// `cargo test -- --ignored` on such a host; on an emulating KVM
/// (kvm_pvm) the nested-virtualization suite covers the same ground.
fn check_userspace(kernel: &Path) {
    assert!(
        host_has_hardware_virtualization(),
        "no vmx/svm in /proc/cpuinfo: KVM here cannot run Linux to userspace"
    );
    assert_userspace(&boot_linux(kernel, true));
}

#[test]
fn linux_elf_vmlinux_boots_through_pvh() {
    assert_early_boot(&boot_linux(&guest_artifacts().vmlinux(), false));
}

#[test]
fn linux_bzimage_boots_through_the_64bit_protocol() {
    assert_early_boot(&boot_linux(&guest_artifacts().bzimage(), false));
}

#[test]
#[ignore = "needs vmx/svm: run with --ignored on a hardware-KVM host"]
fn linux_elf_vmlinux_reaches_userspace() {
    check_userspace(&guest_artifacts().vmlinux());
}

#[test]
#[ignore = "needs vmx/svm: run with --ignored on a hardware-KVM host"]
fn linux_bzimage_reaches_userspace() {
    check_userspace(&guest_artifacts().bzimage());
}
