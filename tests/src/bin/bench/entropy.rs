//! The entropy device beside Firecracker's: the probe guest reads random
//! bytes (`probe.rng_bytes`, in 1 KiB requests) and reports the time taken
//! on kvm-clock, with no limit, a bandwidth limit and an ops limit, both
//! VMMs from the same Firecracker JSON configuration, alternating who
//! goes first. Per limited cell:
//! - `rate`: bytes/s or requests/s after the bucket's first fill (which the
//!   guest gets at once), from the guest's time;
//! - `accuracy`: `rate` over the configured rate (1.0 is exact; below 1 the
//!   guest got less than its due).
//!
//! Cloud Hypervisor's entropy device has no rate limiter and sits on PCI,
//! which the probe does not drive: it is not measured.

use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::guest_artifacts;

use crate::peers::Vmm;
use crate::{machine, summary};

const DEADLINE: Duration = Duration::from_secs(120);
const REQUEST: u64 = 1024;

/// One cell: its limiter, the bytes read, and what the limit allows.
struct Cell {
    name: &'static str,
    limiter: Option<Value>,
    bytes: u64,
    /// (tokens per second, tokens the full bucket gives at once, tokens
    /// per request): bytes for bandwidth, 1 per request for ops.
    limit: Option<(f64, u64, u64)>,
}

fn cells() -> Vec<Cell> {
    vec![
        Cell {
            name: "unlimited",
            limiter: None,
            bytes: 1 << 20,
            limit: None,
        },
        Cell {
            name: "bandwidth_80_kib_s",
            limiter: Some(json!({"bandwidth": {"size": 8192, "refill_time": 100}})),
            bytes: 256 << 10,
            limit: Some((81920.0, 8192, REQUEST)),
        },
        Cell {
            name: "ops_100_s",
            limiter: Some(json!({"ops": {"size": 10, "refill_time": 100}})),
            bytes: 128 << 10,
            limit: Some((100.0, 10, 1)),
        },
    ]
}

pub(crate) fn bench_entropy(runs: usize) -> Value {
    let (mut vmms, mut missing) = Vmm::all();
    vmms.retain(|v| !matches!(v, Vmm::CloudHypervisor(_)));
    missing.push(
        "cloud-hypervisor not measured: its entropy device has no rate limiter and is on PCI"
            .into(),
    );
    let mut out = serde_json::Map::new();
    for cell in cells() {
        let mut per_vmm = serde_json::Map::new();
        let mut samples: Vec<(Vec<f64>, Vec<f64>)> =
            vmms.iter().map(|_| Default::default()).collect();
        for run in 0..runs {
            for k in 0..vmms.len() {
                let at = (run + k) % vmms.len();
                let ms = read_ms(&vmms[at], &cell);
                let (rates, accuracies) = &mut samples[at];
                match cell.limit {
                    Some((per_s, burst, per_request)) => {
                        let tokens = (cell.bytes / REQUEST) * per_request;
                        let rate = (tokens - burst) as f64 / (ms / 1000.0);
                        rates.push(rate);
                        accuracies.push(rate / per_s);
                    }
                    None => rates.push(cell.bytes as f64 / (1 << 20) as f64 / (ms / 1000.0)),
                }
            }
        }
        for (vmm, (rates, accuracies)) in vmms.iter().zip(samples) {
            let figures = if cell.limit.is_some() {
                json!({"rate": summary(rates), "accuracy": summary(accuracies)})
            } else {
                json!({"mib_s": summary(rates)})
            };
            per_vmm.insert(vmm.name().into(), figures);
        }
        eprintln!("entropy {}: {}", cell.name, Value::Object(per_vmm.clone()));
        out.insert(cell.name.into(), Value::Object(per_vmm));
    }
    json!({
        "machine": machine(),
        "runs": runs,
        "guest": "probe guest, 1 vCPU, probe.rng_bytes in 1 KiB requests, timed on kvm-clock",
        "not_measured": missing,
        "cells": out,
    })
}

/// Boots `vmm` with the cell's entropy device and returns the guest's
/// milliseconds for the read.
fn read_ms(vmm: &Vmm, cell: &Cell) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = json!({
        "boot-source": {"kernel_image_path": guest_artifacts().probe(),
                        "boot_args": format!("console=ttyS0 probe.rng_bytes={}", cell.bytes)},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [],
        "entropy": {},
    });
    if let Some(limiter) = &cell.limiter {
        config["entropy"]["rate_limiter"] = limiter.clone();
    }
    let (line, _) = vmm.console_line(&config, dir.path(), "probe.rng=", DEADLINE);
    line.rsplit_once("ms=")
        .and_then(|(_, ms)| ms.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}: {line:?}", vmm.name()))
}
