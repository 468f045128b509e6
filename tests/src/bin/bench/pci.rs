//! `--enable-pci` beside virtio-mmio, and beside Firecracker with and
//! without the same flag, in one run, alternating (A B C D, B C D A, ...):
//!
//! - `--pci` (this host's KVM, the probe guest): the probe's block write
//!   and read-back of `BLOCK_MIB` MiB (its kvm-clock time,
//!   `probe.blk0_ms`), and a host `ping -f` of the probe through a TAP
//!   (round trips per second and average RTT);
//! - `--linux-pci DIR` (inside the nested harness's L1): Linux from DIR,
//!   1 vCPU, with its initramfs: process start to `TESSERA-GUEST-UP`, and to
//!   the VMM's exit (init halts at once).
//!
//! The probe polls its queues, so its figures compare the transports'
//! set-up and notification paths; Linux takes the MSI-X interrupts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::netns::Netns;
use tessera_tests::{guest_artifacts, workspace_bin, Running};

use super::{machine, peers, summary};

const BLOCK_MIB: u64 = 16;
const PINGS: u32 = 2000;
const GUEST_IP: &str = "10.84.0.2";
const GUEST_MAC: &str = "06:00:0a:54:00:02";
const DEADLINE: Duration = Duration::from_secs(180);

/// One VMM on one transport.
struct Cell {
    name: String,
    binary: PathBuf,
    pci: bool,
}

/// Tessera and (when `../shared/peers/` has it) Firecracker, each without
/// and with `--enable-pci`.
fn cells() -> Vec<Cell> {
    let mut vmms = vec![("tessera", workspace_bin("tessera"))];
    vmms.extend(peers::peer_bin("firecracker").map(|bin| ("firecracker", bin)));
    let mut cells = Vec::new();
    for (vmm, binary) in vmms {
        for pci in [false, true] {
            let transport = if pci { "pci" } else { "mmio" };
            cells.push(Cell {
                name: format!("{vmm}-{transport}"),
                binary: binary.clone(),
                pci,
            });
        }
    }
    cells
}

/// The command that boots `config` (a Firecracker JSON file, which both
/// VMMs read) under `cell`, written in `dir`.
fn command(cell: &Cell, config: &Value, dir: &Path, netns: Option<&Netns>) -> Command {
    let path = dir.join(format!("{}.json", cell.name));
    std::fs::write(&path, config.to_string()).expect("write config");
    let mut command = match netns {
        Some(netns) => netns.command(cell.binary.to_str().expect("a UTF-8 path")),
        None => Command::new(&cell.binary),
    };
    command.arg("--no-api").arg("--config-file").arg(path);
    if cell.pci {
        command.arg("--enable-pci");
    }
    command
}

/// The probe's boot arguments under `cell`: Firecracker 1.17 has its boot
/// timer at 0xc000_0000.
fn probe_args(cell: &Cell, args: &str) -> String {
    let timer = if cell.name.starts_with("firecracker") {
        " probe.boot_timer=0xc0000000"
    } else {
        ""
    };
    format!("console=ttyS0{timer} {args}")
}

/// Milliseconds the probe took to write and read back `BLOCK_MIB` MiB.
fn block_ms(cell: &Cell) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(BLOCK_MIB << 21))
        .expect("disk");
    let config = json!({
        "boot-source": {"kernel_image_path": guest_artifacts().probe(),
                        "boot_args": probe_args(cell, &format!("probe.blk=write probe.blk_mib={BLOCK_MIB} probe.seed=0x5eed"))},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "drives": [{"drive_id": "d", "path_on_host": disk, "is_root_device": false, "is_read_only": false}],
    });
    let mut vm = Running::spawn(command(cell, &config, dir.path(), None));
    let done = |out: &str, _: &str| out.contains("probe.blk0_ms=");
    vm.wait_until(DEADLINE, done);
    let run = vm.finish();
    let ms = run
        .stdout
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("probe.blk0_ms="))
        .and_then(|v| v.parse().ok());
    assert!(
        run.stdout.contains("probe.blk0=ok"),
        "{}: {}",
        cell.name,
        run.describe()
    );
    ms.unwrap_or_else(|| panic!("{}: no probe.blk0_ms\n{}", cell.name, run.describe()))
}

/// (round trips per second, average RTT in us) of a ping flood to the
/// probe.
fn ping_flood(cell: &Cell) -> (f64, f64) {
    let netns = Netns::with_tap("benchpci", "10.84.0.1/24");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = json!({
        "boot-source": {"kernel_image_path": guest_artifacts().probe(),
                        "boot_args": probe_args(cell, &format!("probe.net={GUEST_IP}/24 probe.net_serve_ms=100000"))},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC}],
        "drives": [],
    });
    let mut vm = Running::spawn(command(cell, &config, dir.path(), Some(&netns)));
    let up = |out: &str, _: &str| out.contains("probe.net0=up");
    vm.wait_until(DEADLINE, up);
    assert!(
        up(&vm.stdout(), ""),
        "{}: {}\n{}",
        cell.name,
        vm.stdout(),
        vm.stderr()
    );
    let flood = super::net::flood_of(&netns, GUEST_IP, PINGS);
    drop(vm.finish());
    flood.unwrap_or_else(|| panic!("{}: ping -f lost echo requests", cell.name))
}

/// Each cell's samples of `measure`, the cells alternating.
fn alternate<T>(cells: &[Cell], runs: usize, measure: impl Fn(&Cell) -> T) -> Vec<Vec<T>> {
    let mut samples: Vec<Vec<T>> = cells.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for k in 0..cells.len() {
            let at = (run + k) % cells.len();
            samples[at].push(measure(&cells[at]));
            eprintln!("run {}/{runs}: {}", run + 1, cells[at].name);
        }
    }
    samples
}

/// Ratios of each cell's median to the first cell's (Tessera on mmio).
fn ratios(report: &Value, cells: &[Cell], figure: &str) -> Value {
    let median = |cell: &Cell| {
        report[&cell.name][figure]["median"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let base = median(&cells[0]);
    let mut out = json!({});
    for cell in cells {
        out[&cell.name] = json!(median(cell) / base);
    }
    out
}

/// `--pci`: the probe's block and net figures on both transports, under
/// both VMMs.
pub fn bench_pci(runs: usize) -> Value {
    let cells = cells();
    let blocks = alternate(&cells, runs, block_ms);
    let floods = alternate(&cells, runs, ping_flood);
    let mut report = json!({
        "machine": machine(),
        "runs": runs,
        "guest": format!("probe guest, 1 vCPU, 256 MiB; block: write then read back {BLOCK_MIB} MiB (probe.blk0_ms); net: ping -f -c {PINGS} from the host through a TAP"),
    });
    for ((cell, block), flood) in cells.iter().zip(blocks).zip(floods) {
        let mib_per_s: Vec<f64> = block
            .iter()
            .map(|ms| (2 * BLOCK_MIB) as f64 / (ms / 1000.0))
            .collect();
        report[&cell.name] = json!({
            "block_ms": summary(block),
            "block_mib_per_s": summary(mib_per_s),
            "ping_round_trips_per_s": summary(flood.iter().map(|f| f.0).collect()),
            "ping_avg_rtt_us": summary(flood.iter().map(|f| f.1).collect()),
        });
    }
    report["block_ms_over_tessera_mmio"] = ratios(&report, &cells, "block_ms");
    report["ping_rtt_over_tessera_mmio"] = ratios(&report, &cells, "ping_avg_rtt_us");
    report
}

/// `--linux-pci DIR`: Linux booting to its init and halting, on both
/// transports under both VMMs (neither command line has `pci=off`: each
/// VMM adds it without the flag).
pub fn bench_linux_pci(guest_dir: &Path, runs: usize) -> Value {
    let cells = cells();
    let boot = |cell: &Cell| -> (f64, f64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = json!({
            "boot-source": {"kernel_image_path": guest_dir.join("vmlinux"),
                            "initrd_path": guest_dir.join("initramfs.cpio.gz"),
                            "boot_args": "console=ttyS0 reboot=k panic=-1 quiet tessera.halt=1"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
            "drives": [],
        });
        let mut vm = Running::spawn(command(cell, &config, dir.path(), None));
        vm.wait_until(DEADLINE, |out, _| out.contains("TESSERA-GUEST-UP"));
        let up = vm.elapsed();
        let exited = vm.wait_until(DEADLINE, |_, _| false);
        let end = vm.elapsed();
        let run = vm.finish();
        assert!(
            exited && run.stdout.contains("TESSERA-GUEST-UP"),
            "{}: Linux did not boot and halt\n{}",
            cell.name,
            run.describe()
        );
        (up.as_secs_f64() * 1e6, end.as_secs_f64() * 1e6)
    };
    let samples = alternate(&cells, runs, boot);
    let shmem_thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    let mut report = json!({
        "machine": machine(),
        "runs": runs,
        "guest": "Linux 6.1 (vmlinux, PVH), initramfs, 1 vCPU, 256 MiB, quiet, halting at init",
        "shmem_enabled": shmem_thp.trim(),
    });
    for (cell, runs) in cells.iter().zip(samples) {
        report[&cell.name] = json!({
            "guest_up_us": summary(runs.iter().map(|r| r.0).collect()),
            "start_to_exit_us": summary(runs.iter().map(|r| r.1).collect()),
        });
    }
    report["guest_up_over_tessera_mmio"] = ratios(&report, &cells, "guest_up_us");
    report
}
