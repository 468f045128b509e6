//! The balloon beside Firecracker's: the probe guest fills a 160 MiB pool
//! (`probe.balloon=160`, 256 MiB of RAM, a 1 MiB drive so that Tessera's
//! drive backend maps guest memory), then the host inflates the balloon to
//! 128 MiB and deflates it again with `PATCH /balloon`, alternating who
//! goes first. Per VMM:
//! - `returned_mib`: how much the VMM's resident memory (VmRSS) fell when
//!   the balloon inflated;
//! - `refilled_mib`: how much it rose when the guest took the pages back
//!   and wrote them;
//! - `inflate_ms`, `deflate_ms`: from the PATCH to the guest's line saying
//!   the balloon holds its target (the probe polls every 100 ms tick);
//! - Tessera's `file_returned_mib`: what the guest memory file (shared
//!   with the backend) lost, the memory no process keeps.
//!
//! Cloud Hypervisor's balloon is on PCI, which the probe does not drive.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::api::ApiClient;
use tessera_tests::console::whole_lines;
use tessera_tests::{guest_artifacts, Running};

use crate::peers::Vmm;
use crate::{machine, summary};

const DEADLINE: Duration = Duration::from_secs(120);
const MIB: f64 = (1 << 20) as f64;
const POOL_MIB: u64 = 160;
const BALLOON_MIB: u64 = 128;

/// One run's figures.
#[derive(Default)]
struct Sample {
    returned_mib: f64,
    refilled_mib: f64,
    inflate_ms: f64,
    deflate_ms: f64,
    file_returned_mib: Option<f64>,
}

pub(crate) fn bench_balloon(runs: usize) -> Value {
    let (mut vmms, mut missing) = Vmm::all();
    vmms.retain(|v| !matches!(v, Vmm::CloudHypervisor(_)));
    missing.push(
        "cloud-hypervisor not measured: its balloon is on PCI, which the probe does not drive"
            .into(),
    );
    let mut samples: Vec<Vec<Sample>> = vmms.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for k in 0..vmms.len() {
            let at = (run + k) % vmms.len();
            samples[at].push(measure(&vmms[at]));
        }
    }
    let mut per_vmm = serde_json::Map::new();
    for (vmm, samples) in vmms.iter().zip(samples) {
        let of = |f: fn(&Sample) -> f64| summary(samples.iter().map(f).collect());
        let mut cell = json!({
            "returned_mib": of(|s| s.returned_mib),
            "refilled_mib": of(|s| s.refilled_mib),
            "inflate_ms": of(|s| s.inflate_ms),
            "deflate_ms": of(|s| s.deflate_ms),
        });
        let file: Vec<f64> = samples.iter().filter_map(|s| s.file_returned_mib).collect();
        if !file.is_empty() {
            cell["file_returned_mib"] = summary(file);
        }
        per_vmm.insert(vmm.name().into(), cell);
    }
    let cells = Value::Object(per_vmm);
    eprintln!("balloon: {cells}");
    json!({
        "machine": machine(),
        "runs": runs,
        "guest": format!("probe guest, 1 vCPU, 256 MiB, probe.balloon={POOL_MIB}, balloon {BALLOON_MIB} MiB"),
        "not_measured": missing,
        "cells": cells,
    })
}

/// A field of /proc/<pid>/status, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    kib / 1024.0
}

/// MiB of Tessera's guest memory file that hold pages, if `pid` has one.
fn guest_file_mib(pid: u32) -> Option<f64> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let file = fds.filter_map(Result::ok).find(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| target.to_string_lossy().contains("tessera-guest-ram"))
    })?;
    let metadata = std::fs::metadata(file.path()).ok()?;
    Some(std::os::unix::fs::MetadataExt::blocks(&metadata) as f64 * 512.0 / MIB)
}

/// Waits for the guest's last balloon line to be `line`; the time it took.
fn wait_for(vm: &mut Running, line: &str) -> f64 {
    let start = Instant::now();
    vm.wait_until(DEADLINE, |out, _| {
        whole_lines(out)
            .filter(|l| l.starts_with("probe.balloon="))
            .last()
            == Some(line)
    });
    let out = vm.stdout();
    assert!(
        whole_lines(&out).any(|l| l == line),
        "no {line:?}:\n{out}\n{}",
        vm.stderr()
    );
    start.elapsed().as_secs_f64() * 1000.0
}

fn measure(vmm: &Vmm) -> Sample {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let mut vm = Running::spawn(vmm.api_command(&socket));
    assert!(
        tessera_tests::wait_for_path(&socket, DEADLINE),
        "{}: no API socket",
        vmm.name()
    );
    let disk = dir.path().join("disk.img");
    tessera_tests::sparse_file(&disk, 1 << 20);
    let mut c = ApiClient::connect(&socket);
    c.put_ok(
        "/boot-source",
        json!({"kernel_image_path": guest_artifacts().probe(),
               "boot_args": format!("console=ttyS0 probe.balloon={POOL_MIB} probe.memtest=16 probe.ticks=0")}),
    );
    c.put_ok(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 256}),
    );
    c.put_ok(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false,
               "is_read_only": false}),
    );
    c.put_ok(
        "/balloon",
        json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}),
    );
    c.put_ok("/actions", json!({"action_type": "InstanceStart"}));
    vm.wait_until(DEADLINE, |out, _| {
        whole_lines(out).any(|l| l.starts_with("probe.balloon=up"))
    });
    let pid = vm.pid();
    let full = (status_mib(pid, "VmRSS"), guest_file_mib(pid));
    let patch = |c: &mut ApiClient, mib: u64| {
        let r = c.patch("/balloon", &json!({"amount_mib": mib}).to_string());
        assert_eq!(r.status, 204, "{}: {}", vmm.name(), r.body);
    };
    patch(&mut c, BALLOON_MIB);
    let inflate_ms = wait_for(
        &mut vm,
        &format!("probe.balloon={} pages", BALLOON_MIB * 256),
    );
    let inflated = (status_mib(pid, "VmRSS"), guest_file_mib(pid));
    patch(&mut c, 0);
    let deflate_ms = wait_for(&mut vm, "probe.balloon=0 pages");
    let deflated = status_mib(pid, "VmRSS");
    let out = vm.finish().stdout;
    assert!(
        !whole_lines(&out).any(|l| l.starts_with("probe.balloon=bad")),
        "{}: the guest's kept memory changed:\n{out}",
        vmm.name()
    );
    Sample {
        returned_mib: full.0 - inflated.0,
        refilled_mib: deflated - inflated.0,
        inflate_ms,
        deflate_ms,
        file_returned_mib: full.1.zip(inflated.1).map(|(a, b)| a - b),
    }
}
