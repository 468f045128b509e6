//! Start-up beside the peers: Tessera, Firecracker and Cloud Hypervisor
//! each boot the same probe guest (1 vCPU, 128 MiB), in turn, and each run
//! measures, per VMM:
//! - `boot_to_done_ms`: process start until the probe's last line
//!   (`probe.done`) reaches the harness through the console pipe;
//! - `overhead_kib` / `private_kib` / `dirty_kib`: the RSS of every
//!   mapping but guest RAM, the part no other process maps, and the part
//!   written to (anonymous and relocated pages), while the guest ticks. A
//!   binary's clean text is private while one VMM runs and shared once a
//!   second maps it; its dirty pages are what each further VMM costs;
//! - `vmm_cpu_ms`: the CPU time of the VMM's own threads (all but the
//!   vCPUs) from process start until the guest has ticked twice;
//! - `api_ready_ms`: process start (API socket only) until the API
//!   answers its ping (`GET /`; Cloud Hypervisor's `vmm.ping`).

use std::time::Duration;

use serde_json::json;
use tessera_tests::api::ApiClient;
use tessera_tests::{guest_artifacts, probe_cmdline, Running, VmConfig};

use crate::peers::Vmm;
use crate::{machine, summary};

const MEM_MIB: usize = 128;
const DEADLINE: Duration = Duration::from_secs(30);

/// One VMM's samples.
#[derive(Default)]
struct Samples {
    boot_to_done_ms: Vec<f64>,
    overhead_kib: Vec<f64>,
    private_kib: Vec<f64>,
    dirty_kib: Vec<f64>,
    vmm_cpu_ms: Vec<f64>,
    api_ready_ms: Vec<f64>,
}

pub(crate) fn bench_startup(runs: usize) -> serde_json::Value {
    // A binary just linked is dirty in the page cache until written back,
    // and its text would count as dirty memory of the VMM.
    nix::unistd::sync();
    let (vmms, missing) = Vmm::all();
    let mut samples: Vec<Samples> = vmms.iter().map(|_| Samples::default()).collect();
    for run in 0..runs {
        // Alternate who goes first.
        for k in 0..vmms.len() {
            let at = (run + k) % vmms.len();
            let (vmm, s) = (&vmms[at], &mut samples[at]);
            s.boot_to_done_ms.push(boot_to_done_ms(vmm));
            let (overhead, cpu) = ticking_sample(vmm);
            s.overhead_kib.push(overhead.rss);
            s.private_kib.push(overhead.private);
            s.dirty_kib.push(overhead.dirty);
            s.vmm_cpu_ms.push(cpu);
            s.api_ready_ms.push(api_ready_ms(vmm));
        }
        eprintln!("startup run {}/{runs} done", run + 1);
    }
    let mut per_vmm = serde_json::Map::new();
    for (vmm, s) in vmms.iter().zip(samples) {
        per_vmm.insert(
            vmm.name().to_string(),
            json!({
                "boot_to_done_ms": summary(s.boot_to_done_ms),
                "overhead_kib": summary(s.overhead_kib),
                "private_kib": summary(s.private_kib),
                "dirty_kib": summary(s.dirty_kib),
                "vmm_cpu_ms": summary(s.vmm_cpu_ms),
                "api_ready_ms": summary(s.api_ready_ms),
            }),
        );
    }
    let ratios = ratios_to_tessera(&per_vmm);
    json!({
        "machine": machine(),
        "runs": runs,
        "guest": "probe guest, 1 vCPU, 128 MiB, booted from a config (no API) unless noted",
        "vmms": per_vmm,
        "tessera_over_peer_medians": ratios,
        "missing": missing,
    })
}

/// Tessera's median over each peer's, per figure.
fn ratios_to_tessera(per_vmm: &serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    let Some(ours) = per_vmm.get("tessera") else {
        return json!({});
    };
    let mut out = serde_json::Map::new();
    for (name, theirs) in per_vmm.iter().filter(|(name, _)| *name != "tessera") {
        let mut figures = serde_json::Map::new();
        for (figure, value) in ours.as_object().into_iter().flatten() {
            let (a, b) = (value["median"].as_f64(), theirs[figure]["median"].as_f64());
            if let (Some(a), Some(b)) = (a, b) {
                figures.insert(figure.clone(), json!(a / b));
            }
        }
        out.insert(name.clone(), figures.into());
    }
    out.into()
}

fn probe_config(extra: &str) -> VmConfig {
    VmConfig::new(guest_artifacts().probe(), &probe_cmdline(extra)).mem_mib(MEM_MIB)
}

/// Process start to `probe.done` on the console.
fn boot_to_done_ms(vmm: &Vmm) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vm = Running::spawn(vmm.boot_command(&probe_config(""), dir.path()));
    vm.wait_until(DEADLINE, |stdout, _| stdout.contains("probe.done"));
    let took = vm.elapsed();
    let run = vm.finish();
    assert!(
        run.stdout.contains("probe.done"),
        "{}: the probe did not finish\n{}",
        vmm.name(),
        run.describe()
    );
    took.as_secs_f64() * 1e3
}

/// The VMM's memory outside guest RAM and its CPU ms, with the guest ticking.
fn ticking_sample(vmm: &Vmm) -> (Overhead, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vm = Running::spawn(vmm.boot_command(&probe_config("probe.ticks=0"), dir.path()));
    let exited = vm.wait_until(DEADLINE, |stdout, _| stdout.contains("probe.tick=2"));
    let sample = (!exited)
        .then(|| {
            let overhead = overhead_kib(vm.pid(), MEM_MIB)?;
            Some((overhead, vmm_cpu_seconds(vmm, vm.pid())? * 1e3))
        })
        .flatten();
    let run = vm.finish();
    sample.unwrap_or_else(|| panic!("{}: no sample\n{}", vmm.name(), run.describe()))
}

/// Process start (with only an API socket) until the API answers.
fn api_ready_ms(vmm: &Vmm) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let vm = Running::spawn(vmm.api_command(&socket));
    let mut client = ApiClient::connect(&socket);
    let status = client.get(vmm.ping_path()).status;
    let took = vm.elapsed();
    let run = vm.finish();
    assert_eq!(
        status,
        200,
        "{}: API ping failed\n{}",
        vmm.name(),
        run.describe()
    );
    took.as_secs_f64() * 1e3
}

/// The CPU time of the VMM's threads other than its vCPUs, from each
/// thread's `schedstat` (nanoseconds; `stat` counts 10 ms ticks). A thread
/// that already exited is not counted; none of the three VMMs ends one
/// while it boots.
fn vmm_cpu_seconds(vmm: &Vmm, pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let task = task.ok()?.path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if vmm.is_vcpu_thread(comm.trim()) {
            continue;
        }
        let schedstat = std::fs::read_to_string(task.join("schedstat")).ok()?;
        ns += schedstat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// KiB of a VMM's mappings outside guest RAM.
pub(crate) struct Overhead {
    pub rss: f64,
    /// Mapped by no other process (a binary's text too, while it runs once).
    pub private: f64,
    /// Written to: anonymous and relocated pages, which no VMM shares.
    pub dirty: f64,
}

/// The RSS of all mappings except guest RAM: the mapping named for it, or
/// one exactly as large as the guest's memory.
pub(crate) fn overhead_kib(pid: u32, mem_mib: usize) -> Option<Overhead> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = Overhead {
        rss: 0.0,
        private: 0.0,
        dirty: 0.0,
    };
    let mut in_guest_ram = false;
    let kib = |rest: &str| {
        rest.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<f64>()
            .ok()
    };
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let size = u64::from_str_radix(end, 16).ok()? - u64::from_str_radix(start, 16).ok()?;
            in_guest_ram =
                line.contains(crate::GUEST_RAM_MAPPING) || size == (mem_mib as u64) << 20;
        } else if in_guest_ram {
            continue;
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            total.rss += kib(rest)?;
        } else if let Some(rest) = line.strip_prefix("Private_Clean:") {
            total.private += kib(rest)?;
        } else if let Some(rest) = line.strip_prefix("Private_Dirty:") {
            let dirty = kib(rest)?;
            total.private += dirty;
            total.dirty += dirty;
        }
    }
    Some(total)
}
