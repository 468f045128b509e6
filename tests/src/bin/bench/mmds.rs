//! MMDS beside Firecracker's: the probe guest (1 vCPU, its MMDS client)
//! gets a V2 session token, then reads `/latest/meta-data/ami-id` 50 times
//! in a row, each on a new TCP connection (ARP once, then SYN, request,
//! response, FIN per read). The host polls the console every millisecond
//! and takes the time from the first answer line to the 50th: per read,
//! `ms_per_read`. Both VMMs boot the same Firecracker JSON configuration
//! (`mmds-config` V2 on the interface, `--metadata`), alternating who goes
//! first.
//!
//! Tessera's MMDS is in the interface's `vhost-user-net` process;
//! Firecracker's in its VMM thread. Cloud Hypervisor has no MMDS.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::console::whole_lines;
use tessera_tests::netns::Netns;
use tessera_tests::{guest_artifacts, Running};

use crate::peers::Vmm;
use crate::{machine, summary};

const DEADLINE: Duration = Duration::from_secs(120);
const READS: usize = 50;

pub(crate) fn bench_mmds(runs: usize) -> Value {
    let (mut vmms, mut missing) = Vmm::all();
    vmms.retain(|v| !matches!(v, Vmm::CloudHypervisor(_)));
    missing.push("cloud-hypervisor not measured: it has no MMDS".into());
    let mut times: Vec<Vec<f64>> = vmms.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for k in 0..vmms.len() {
            let at = (run + k) % vmms.len();
            times[at].push(ms_per_read(&vmms[at]));
        }
    }
    let mut per_vmm = serde_json::Map::new();
    for (vmm, times) in vmms.iter().zip(times) {
        per_vmm.insert(vmm.name().into(), json!({"ms_per_read": summary(times)}));
    }
    eprintln!("mmds: {}", Value::Object(per_vmm.clone()));
    json!({
        "machine": machine(),
        "runs": runs,
        "guest": format!("probe guest, 1 vCPU; MMDS V2: a token, then {READS} GETs, a connection each"),
        "not_measured": missing,
        "cells": {"v2_get_new_connection": per_vmm},
    })
}

fn answers(out: &str) -> usize {
    whole_lines(out)
        .filter(|l| l.starts_with("probe.mmds="))
        .count()
}

/// One run: the milliseconds per read between the first answer and the
/// last.
fn ms_per_read(vmm: &Vmm) -> f64 {
    let netns = Netns::with_tap("mmdsbench", "10.83.0.1/24");
    let dir = tempfile::tempdir().expect("tempdir");
    let metadata = dir.path().join("metadata.json");
    std::fs::write(
        &metadata,
        r#"{"latest": {"meta-data": {"ami-id": "ami-12345678"}}}"#,
    )
    .expect("write the metadata");
    let config = json!({
        "boot-source": {"kernel_image_path": guest_artifacts().probe(),
                        "boot_args": format!(
                            "console=ttyS0 probe.net=10.83.0.2/24 probe.mmds=/latest/meta-data/ami-id \
                             probe.mmds_token=60 probe.mmds_repeat={READS} probe.mmds_every_ms=0")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                "guest_mac": "06:00:0a:53:00:02"}],
        "mmds-config": {"version": "V2", "network_interfaces": ["eth0"]},
    });
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    let bin = match vmm {
        Vmm::Tessera => tessera_tests::workspace_bin("tessera"),
        Vmm::Firecracker(bin) | Vmm::CloudHypervisor(bin) => bin.clone(),
    };
    let mut command = netns.command(bin.to_str().expect("a UTF-8 path"));
    command
        .arg("--no-api")
        .arg("--config-file")
        .arg(&path)
        .arg("--metadata")
        .arg(&metadata);
    let vm = Running::spawn(command);
    let start = Instant::now();
    let mut first = None;
    let mut last = None;
    while start.elapsed() < DEADLINE && last.is_none() {
        let seen = answers(&vm.stdout());
        if seen >= 1 && first.is_none() {
            first = Some(Instant::now());
        }
        if seen >= READS {
            last = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = vm.finish();
    let (Some(first), Some(last)) = (first, last) else {
        panic!(
            "{}: not {READS} MMDS answers:\n{}\n{}",
            vmm.name(),
            out.stdout,
            out.stderr
        );
    };
    let good = whole_lines(&out.stdout)
        .filter(|l| *l == "probe.mmds=200 ami-12345678")
        .count();
    assert_eq!(good, READS, "{}: answers\n{}", vmm.name(), out.stdout);
    last.duration_since(first).as_secs_f64() * 1000.0 / (READS - 1) as f64
}
