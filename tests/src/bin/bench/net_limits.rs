//! An interface's rate limiters beside Firecracker's: the host floods the
//! probe guest with pings (`ping -f -l 16 -s 1000` from the TAP's network
//! namespace, faster than the limit) and counts, over three seconds after
//! a first second of flood, the replies that reach the TAP (its `rx_packets`
//! counter: one frame from the guest per request it got). A limit of 50
//! frames/s on either direction holds the replies to 50/s. Both VMMs boot
//! the same Firecracker JSON configuration, alternating who goes first.
//! Per cell: `rate` (frames/s) and `accuracy` (`rate` over the limit).
//!
//! Tessera's limiters are in the interface's `vhost-user-net` process;
//! Firecracker's in its VMM. Cloud Hypervisor's virtio-net is on PCI.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::console::whole_lines;
use tessera_tests::netns::Netns;
use tessera_tests::{guest_artifacts, Running};

use crate::peers::Vmm;
use crate::{machine, summary};

const DEADLINE: Duration = Duration::from_secs(120);
const GUEST_IP: &str = "10.79.0.2";
const PING_DATA: u64 = 1000;
/// An echo frame as both limiters charge it: Ethernet, IPv4, ICMP, the
/// data and the virtio-net header.
const FRAME: u64 = 12 + 14 + 20 + 8 + PING_DATA;
const MEASURE: Duration = Duration::from_secs(3);
const LIMIT_PER_S: f64 = 50.0;

struct Cell {
    name: &'static str,
    /// The interface's limiter fields.
    limits: Value,
}

fn cells() -> Vec<Cell> {
    vec![
        Cell {
            name: "tx_ops_50_s",
            limits: json!({"tx_rate_limiter": {"ops": {"size": 5, "refill_time": 100}}}),
        },
        Cell {
            name: "rx_bandwidth_50_frames_s",
            limits: json!({"rx_rate_limiter": {"bandwidth": {"size": 5 * FRAME, "refill_time": 100}}}),
        },
    ]
}

pub(crate) fn bench_net_limits(runs: usize) -> Value {
    let (mut vmms, mut missing) = Vmm::all();
    vmms.retain(|v| !matches!(v, Vmm::CloudHypervisor(_)));
    missing.push(
        "cloud-hypervisor not measured: its virtio devices are on PCI, which the probe does not drive"
            .into(),
    );
    let mut out = serde_json::Map::new();
    for cell in cells() {
        let mut rates: Vec<Vec<f64>> = vmms.iter().map(|_| Vec::new()).collect();
        for run in 0..runs {
            for k in 0..vmms.len() {
                let at = (run + k) % vmms.len();
                rates[at].push(flood_rate(&vmms[at], &cell));
            }
        }
        let mut per_vmm = serde_json::Map::new();
        for (vmm, rates) in vmms.iter().zip(rates) {
            let accuracies = rates.iter().map(|r| r / LIMIT_PER_S).collect();
            per_vmm.insert(
                vmm.name().into(),
                json!({"rate": summary(rates), "accuracy": summary(accuracies)}),
            );
        }
        eprintln!(
            "net limits {}: {}",
            cell.name,
            Value::Object(per_vmm.clone())
        );
        out.insert(cell.name.into(), Value::Object(per_vmm));
    }
    json!({
        "machine": machine(),
        "runs": runs,
        "guest": "probe guest, 1 vCPU, probe.net serving; host ping -f -l 16 -s 1000",
        "limit_frames_per_s": LIMIT_PER_S,
        "not_measured": missing,
        "cells": out,
    })
}

/// The TAP's counter of frames from the guest.
fn tap_rx_packets(netns: &Netns) -> u64 {
    let out = netns
        .command("cat")
        .arg("/sys/class/net/tap0/statistics/rx_packets")
        .output()
        .expect("read the TAP's counters");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a counter")
}

/// Boots `vmm` on a fresh TAP with the cell's limits and returns the
/// guest's replies per second under a flood.
fn flood_rate(vmm: &Vmm, cell: &Cell) -> f64 {
    let netns = Netns::with_tap("nlbench", "10.79.0.1/24");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut iface = json!({"iface_id": "eth0", "host_dev_name": "tap0",
                           "guest_mac": "06:00:0a:4f:00:02"});
    for (key, value) in cell.limits.as_object().expect("an object") {
        iface[key] = value.clone();
    }
    let config = json!({
        "boot-source": {"kernel_image_path": guest_artifacts().probe(),
                        "boot_args": format!("console=ttyS0 probe.net={GUEST_IP}/24 probe.net_serve_ms=100000")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [],
        "network-interfaces": [iface],
    });
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    let bin = match vmm {
        Vmm::Tessera => tessera_tests::workspace_bin("tessera"),
        Vmm::Firecracker(bin) | Vmm::CloudHypervisor(bin) => bin.clone(),
    };
    let mut command = netns.command(bin.to_str().expect("a UTF-8 path"));
    command.arg("--no-api").arg("--config-file").arg(&path);
    let mut vm = Running::spawn(command);
    vm.wait_until(DEADLINE, |out, _| {
        whole_lines(out).any(|l| l.starts_with("probe.net0="))
    });
    assert!(
        vm.stdout().contains("probe.net0=up"),
        "{}: the guest's network did not come up:\n{}\n{}",
        vmm.name(),
        vm.stdout(),
        vm.stderr()
    );
    let warm = netns
        .command("ping")
        .args(["-c", "1", "-W", "5", GUEST_IP])
        .output()
        .expect("run ping");
    assert!(warm.status.success(), "{}: no echo", vmm.name());
    std::thread::sleep(Duration::from_secs(1));
    let seconds = (MEASURE.as_secs() + 2).to_string();
    let mut flood: std::process::Child = netns
        .command("ping")
        .args([
            "-q",
            "-f",
            "-l",
            "16",
            "-s",
            &PING_DATA.to_string(),
            "-w",
            &seconds,
            GUEST_IP,
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("run ping");
    std::thread::sleep(Duration::from_secs(1));
    let before = tap_rx_packets(&netns);
    let start = Instant::now();
    std::thread::sleep(MEASURE);
    let after = tap_rx_packets(&netns);
    let rate = (after - before) as f64 / start.elapsed().as_secs_f64();
    let _ = flood.wait();
    drop(vm.finish());
    rate
}
