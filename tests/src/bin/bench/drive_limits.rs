//! A drive's rate limiter beside Firecracker's: the probe guest writes 2
//! MiB and reads them back (`probe.blk=write`) on a drive limited to 1
//! MiB/s, timing the test on kvm-clock (`probe.blk0_ms`); both VMMs from
//! the same Firecracker JSON configuration, alternating who goes first.
//! Per cell:
//! - `rate`: bytes/s after the bucket's first fill;
//! - `accuracy`: `rate` over the configured rate (1.0 is exact).
//!
//! Tessera's limiter is in the drive's `vhost-user-blk` process (a debt
//! holds its queues back); Firecracker's in its VMM.

use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::guest_artifacts;

use crate::peers::Vmm;
use crate::{machine, summary};

const DEADLINE: Duration = Duration::from_secs(300);
const MIB_WRITTEN: u64 = 2;
/// Written, then read back.
const BYTES: u64 = (2 * MIB_WRITTEN) << 20;

/// One cell: its limiter, the bytes per second it allows and its full
/// bucket's.
struct Cell {
    name: &'static str,
    limiter: Value,
    per_s: f64,
    burst: u64,
}

fn cells() -> Vec<Cell> {
    vec![Cell {
        name: "bandwidth_1_mib_s",
        limiter: json!({"bandwidth": {"size": 262144, "refill_time": 250}}),
        per_s: (1 << 20) as f64,
        burst: 262144,
    }]
}

pub(crate) fn bench_drive_limits(runs: usize) -> Value {
    let (mut vmms, mut missing) = Vmm::all();
    vmms.retain(|v| !matches!(v, Vmm::CloudHypervisor(_)));
    missing.push(
        "cloud-hypervisor not measured: its virtio devices are on PCI, which the probe does not drive"
            .into(),
    );
    let mut out = serde_json::Map::new();
    for cell in cells() {
        let mut samples: Vec<(Vec<f64>, Vec<f64>)> =
            vmms.iter().map(|_| Default::default()).collect();
        for run in 0..runs {
            for k in 0..vmms.len() {
                let at = (run + k) % vmms.len();
                let ms = test_ms(&vmms[at], &cell);
                let rate = (BYTES - cell.burst) as f64 / (ms / 1000.0);
                samples[at].0.push(rate);
                samples[at].1.push(rate / cell.per_s);
            }
        }
        let mut per_vmm = serde_json::Map::new();
        for (vmm, (rates, accuracies)) in vmms.iter().zip(samples) {
            per_vmm.insert(
                vmm.name().into(),
                json!({"rate": summary(rates), "accuracy": summary(accuracies)}),
            );
        }
        eprintln!(
            "drive limits {}: {}",
            cell.name,
            Value::Object(per_vmm.clone())
        );
        out.insert(cell.name.into(), Value::Object(per_vmm));
    }
    json!({
        "machine": machine(),
        "runs": runs,
        "guest": "probe guest, 1 vCPU, probe.blk=write probe.blk_mib=2, timed on kvm-clock",
        "not_measured": missing,
        "cells": out,
    })
}

/// Boots `vmm` with the cell's limited drive and returns the guest's
/// milliseconds for its write-and-read-back.
fn test_ms(vmm: &Vmm, cell: &Cell) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("data.img");
    tessera_tests::sparse_file(&disk, MIB_WRITTEN << 20);
    let config = json!({
        "boot-source": {"kernel_image_path": guest_artifacts().probe(),
                        "boot_args": format!("console=ttyS0 probe.blk=write probe.blk_mib={MIB_WRITTEN} probe.seed=0x5eed")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [{"drive_id": "data", "path_on_host": disk, "is_root_device": false,
                    "is_read_only": false, "rate_limiter": cell.limiter}],
    });
    let (ms, out) = vmm.console_line(&config, dir.path(), "probe.blk0_ms=", DEADLINE);
    assert!(
        out.contains("probe.blk0=ok"),
        "{}: the block test failed:\n{out}",
        vmm.name()
    );
    ms.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}: probe.blk0_ms={ms}", vmm.name()))
}
