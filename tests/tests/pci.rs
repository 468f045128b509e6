//! `--enable-pci` under this host's KVM, with the probe guest's virtio-pci
//! driver: every device is a function on bus 0 behind the Intel host
//! bridge, found through port 0xCF8 and through ECAM (MCFG), with its
//! BAR0 in the fixed window; block writes land on the host file byte for
//! byte (and read back over virtio-mmio); MSI-X vectors deliver to the
//! LAPIC, stay pending while masked and arrive on unmask; the network
//! device carries pings over two queue pairs; hostile configuration and
//! BAR accesses leave the VMM and the devices working; and more devices
//! than slots is a clear error.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tessera_tests::netns::Netns;
use tessera_tests::{guest_artifacts, workspace_bin, RunOutput, Running};

const DEADLINE: Duration = Duration::from_secs(60);
const SEED: u64 = 0x05ee_d0c1;

fn boot(dir: &Path, config: serde_json::Value, flags: &[&str]) -> RunOutput {
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = std::process::Command::new(workspace_bin("tessera"));
    command
        .args(["--no-api", "--config-file"])
        .arg(&path)
        .args(flags);
    tessera_tests::run_with_deadline(command, DEADLINE, |_, _| false)
}

fn probe(args: &str, drives: serde_json::Value) -> serde_json::Value {
    json!({
        "boot-source": {"kernel_image_path": guest_artifacts().probe(),
                        "boot_args": format!("console=ttyS0 {args}")},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "drives": drives,
    })
}

fn drive(id: &str, path: &Path) -> serde_json::Value {
    json!({"drive_id": id, "path_on_host": path, "is_root_device": false})
}

fn assert_lines(run: &RunOutput, lines: &[&str]) {
    for line in lines {
        assert!(
            run.stdout.lines().any(|l| l.trim_end() == *line),
            "no line {line:?}:\n{}",
            run.describe()
        );
    }
}

#[test]
fn devices_are_pci_functions_with_msix_and_blocks_land_on_the_host_file() {
    let dir = tempfile::tempdir().unwrap();
    let disk = tessera_tests::sparse_file(&dir.path().join("disk.img"), 8 << 20);
    let mut config = probe(
        &format!("probe.blk=write probe.blk_mib=4 probe.seed={SEED:#x} probe.msix"),
        json!([drive("data", &disk)]),
    );
    config["entropy"] = json!({});
    let run = boot(dir.path(), config, &["--enable-pci"]);
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert_lines(
        &run,
        &[
            "probe.pci_ecam=0xeec00000 segment=0 buses=0-0 check=ok reads=6",
            "probe.pci=00:00.0,8086:0d57,class=0600,bar0=0x0",
            "probe.pci=00:01.0,1af4:1042,class=0180,bar0=0xd8000000",
            "probe.pci=00:02.0,1af4:1044,class=ff00,bar0=0xd8080000",
            "probe.virtio=0,2,pci:00:01.0",
            "probe.blk0=ok sectors=8192 queues=2",
            "probe.virtio=1,4,pci:00:02.0",
            "probe.virtio_rng=1,ok",
        ],
    );
    // MSI-X: delivered, held while masked, delivered on unmask; Tessera
    // keeps no PBA (a masked vector's count waits in its eventfd).
    for (index, vectors) in [(0, 3), (1, 2)] {
        let want = format!("probe.msix{index}=ok vectors={vectors} pba=not-set");
        assert_lines(&run, &[&want]);
    }
    assert!(!run.stdout.contains("virtio-mmio"), "{}", run.stdout);
    for sector in [0u64, 1, 8191] {
        let bytes = std::fs::read(&disk).unwrap();
        let at = (sector * 512) as usize;
        assert_eq!(
            bytes[at..at + 8],
            (sector ^ SEED).to_le_bytes(),
            "sector {sector}"
        );
    }
    // The same bytes read back over virtio-mmio.
    let config = probe(
        &format!("probe.blk=verify probe.blk_mib=4 probe.seed={SEED:#x}"),
        json!([drive("data", &disk)]),
    );
    let run = boot(dir.path(), config, &[]);
    assert_lines(
        &run,
        &[
            "probe.virtio=0,2,0xd0001000",
            "probe.blk0=ok sectors=8192 queues=2",
        ],
    );
}

#[test]
fn hostile_config_and_bar_accesses_leave_the_devices_working() {
    let dir = tempfile::tempdir().unwrap();
    let disk = tessera_tests::sparse_file(&dir.path().join("disk.img"), 4 << 20);
    let mut config = probe(
        &format!("probe.pci_hostile probe.blk=write probe.blk_mib=2 probe.seed={SEED:#x}"),
        json!([drive("data", &disk)]),
    );
    config["entropy"] = json!({});
    let run = boot(dir.path(), config, &["--enable-pci"]);
    assert_eq!(run.code(), 0, "{}", run.describe());
    let hostile: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("probe.pci_hostile="))
        .collect();
    assert_eq!(hostile.len(), 2, "{}", run.describe());
    for line in hostile {
        assert!(
            line.starts_with("probe.pci_hostile=ok "),
            "{line}\n{}",
            run.describe()
        );
    }
    assert_lines(
        &run,
        &[
            "probe.blk0=ok sectors=4096 queues=2",
            "probe.virtio_rng=1,ok",
        ],
    );
}

#[test]
fn the_network_device_on_pci_carries_pings_over_two_queue_pairs() {
    let netns = Netns::with_multi_queue_tap("pcinet", "10.79.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let mut config = probe(
        "probe.net=10.79.0.2/24 probe.net_queues=2 probe.net_serve_ms=100000",
        json!([]),
    );
    config["network-interfaces"] = json!([{"iface_id": "eth0", "host_dev_name": "tap0",
        "guest_mac": "06:00:0a:4f:00:02", "num_queue_pairs": 2}]);
    let path = dir.path().join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = netns.command(workspace_bin("tessera").to_str().unwrap());
    command
        .args(["--no-api", "--enable-pci", "--config-file"])
        .arg(&path);
    let mut vm = Running::spawn(command);
    // The whole line: the harness may see it in pieces.
    let up = |out: &str, _: &str| {
        out.split_once("probe.net0=")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    };
    vm.wait_until(DEADLINE, up);
    assert!(
        vm.stdout()
            .contains("probe.net0=up mac=06:00:0a:4f:00:02 queues=2"),
        "{}\n{}",
        vm.stdout(),
        vm.stderr()
    );
    let ping = netns
        .command("ping")
        .args(["-c", "5", "-i", "0.1", "-W", "5", "10.79.0.2"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&ping.stdout);
    assert!(out.contains("5 received"), "{out}\n{}", vm.stdout());
    assert!(vm.stdout().contains("probe.virtio=0,1,pci:00:01.0"));
    vm.finish();
}

#[test]
fn more_devices_than_slots_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let drives: Vec<serde_json::Value> = (0..32)
        .map(|i| {
            let disk = tessera_tests::sparse_file(&dir.path().join(format!("d{i}")), 1 << 20);
            drive(&format!("d{i}"), &disk)
        })
        .collect();
    let run = boot(dir.path(), probe("", json!(drives)), &["--enable-pci"]);
    assert_ne!(run.code(), 0);
    assert!(
        run.stderr.contains(
            "too many virtio devices: drive d31: no PCI slot is free: the bus holds 31 devices"
        ),
        "{}",
        run.describe()
    );
}
