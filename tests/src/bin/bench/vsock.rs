//! vsock beside Firecracker: Tessera (the `vhost-user-vsock` process) and
//! Firecracker (the device in its VMM), both with Firecracker's hybrid
//! host socket and the probe guest's vsock driver, in one run, alternating
//! who goes first (Cloud Hypervisor puts its devices on PCI, which the
//! probe does not drive):
//!
//! - `connect_ms`: a host client's `CONNECT <port>` until `OK`, over
//!   [`CONNECTS`] connections in a row;
//! - `rtt_us`: a 64-byte message to the guest's echo and back, over
//!   [`ROUND_TRIPS`] round trips (median per run);
//! - `echo_mib_s`: [`ECHO_BYTES`] sent through the guest's echo while
//!   reading it back (each byte crosses both ways);
//! - `guest_to_host_mib_s`: [`SEND_BYTES`] the guest sends to a host
//!   listener at `<uds_path>_<port>` (from its REQUEST to the last byte);
//! - `device_cpu_s_per_gib`: the CPU time of the device's side per GiB
//!   moved in the echo: every VMM thread but the vCPUs, and for Tessera
//!   its backend process too.
//!
//! The probe's driver polls, and every guest instruction may be emulated
//! here (kvm_pvm): the guest bounds the throughput, the same for both.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::vsock::{connect, echo_through, is_guest_pattern, pattern};
use tessera_tests::{descendant_pid, guest_artifacts, probe_cmdline, Running, VmConfig};

use crate::peers::Vmm;
use crate::{machine, summary};

const PORT: u32 = 52;
const CONNECTS: usize = 50;
const ROUND_TRIPS: usize = 200;
const ECHO_BYTES: usize = 32 << 20;
const SEND_BYTES: usize = 16 << 20;
const DEADLINE: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Samples {
    connect_ms: Vec<f64>,
    rtt_us: Vec<f64>,
    echo_mib_s: Vec<f64>,
    guest_to_host_mib_s: Vec<f64>,
    device_cpu_s_per_gib: Vec<f64>,
}

pub(crate) fn bench_vsock(runs: usize) -> serde_json::Value {
    let (mut vmms, mut missing) = Vmm::all();
    if vmms.iter().any(|v| matches!(v, Vmm::CloudHypervisor(_))) {
        vmms.retain(|v| !matches!(v, Vmm::CloudHypervisor(_)));
        missing.push(
            "cloud-hypervisor not measured: its virtio devices are on PCI, and the probe \
             guest drives virtio-mmio only"
                .into(),
        );
    }
    let mut samples: Vec<Samples> = vmms.iter().map(|_| Samples::default()).collect();
    for run in 0..runs {
        for k in 0..vmms.len() {
            let at = (run + k) % vmms.len();
            let (vmm, s) = (&vmms[at], &mut samples[at]);
            echo_run(vmm, s);
            s.guest_to_host_mib_s.push(guest_to_host_mib_s(vmm));
        }
        eprintln!("vsock run {}/{runs} done", run + 1);
    }
    let mut per_vmm = serde_json::Map::new();
    for (vmm, s) in vmms.iter().zip(samples) {
        per_vmm.insert(
            vmm.name().to_string(),
            json!({
                "connect_ms": summary(s.connect_ms),
                "rtt_us": summary(s.rtt_us),
                "echo_mib_s": summary(s.echo_mib_s),
                "guest_to_host_mib_s": summary(s.guest_to_host_mib_s),
                "device_cpu_s_per_gib": summary(s.device_cpu_s_per_gib),
            }),
        );
    }
    json!({
        "machine": machine(),
        "runs": runs,
        "guest": "probe guest (polling virtio-vsock driver, 4 KiB RX buffers), 1 vCPU, 128 MiB",
        "vmms": per_vmm,
        "missing": missing,
    })
}

fn probe_config(extra: &str) -> VmConfig {
    VmConfig::new(guest_artifacts().probe(), &probe_cmdline(extra))
}

/// Boots `vmm` with `probe_args` and a vsock device at `dir/v.sock`, and
/// waits for `ready` on the console.
fn boot(vmm: &Vmm, dir: &Path, probe_args: &str, ready: &str) -> Running {
    let uds = dir.join("v.sock");
    let command = vmm.boot_command_with_vsock(&probe_config(probe_args), dir, Some(&uds));
    let mut vm = Running::spawn(command);
    vm.wait_until(DEADLINE, |out, _| {
        out.contains(ready) || out.contains("probe.vsock=error")
    });
    assert!(
        vm.stdout().contains(ready),
        "{}: stdout:\n{}\nstderr:\n{}",
        vmm.name(),
        vm.stdout(),
        vm.stderr()
    );
    vm
}

/// CPU seconds of process `pid`'s threads that `count` accepts (by
/// name), from each thread's `schedstat` (nanoseconds; `stat` counts
/// 10 ms ticks, too coarse for one transfer).
fn threads_cpu_seconds(pid: u32, count: impl Fn(&str) -> bool) -> f64 {
    let mut ns = 0u64;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !count(comm.trim()) {
            continue;
        }
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        ns += schedstat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}

/// CPU seconds of the device's side: the VMM's threads but its vCPUs,
/// and Tessera's backend process.
fn device_cpu_seconds(vmm: &Vmm, vm: &Running) -> f64 {
    let mut total = threads_cpu_seconds(vm.pid(), |comm| !vmm.is_vcpu_thread(comm));
    if matches!(vmm, Vmm::Tessera) {
        if let Some(backend) = descendant_pid(vm.pid(), "vhost-user-vsock") {
            total += threads_cpu_seconds(backend, |_| true);
        }
    }
    total
}

/// One boot with the guest echoing: connection set-up, round trips and
/// echo throughput.
fn echo_run(vmm: &Vmm, s: &mut Samples) {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let connections = CONNECTS + 2;
    let vm = boot(
        vmm,
        dir.path(),
        &format!("probe.vsock=echo:{PORT}:{connections} probe.vsock_timeout_ms=240000"),
        &format!("probe.vsock=listening {PORT}"),
    );
    let mut connect_ms = Vec::new();
    for _ in 0..CONNECTS {
        let started = Instant::now();
        let stream = connect(&uds, PORT).expect("the guest accepts");
        connect_ms.push(started.elapsed().as_secs_f64() * 1e3);
        drop(stream);
    }
    s.connect_ms.push(median(connect_ms));

    let mut rtt_us = Vec::new();
    let mut stream = connect(&uds, PORT).expect("the guest accepts");
    let message = [0x5au8; 64];
    for _ in 0..ROUND_TRIPS {
        let started = Instant::now();
        std::io::Write::write_all(&mut stream, &message).expect("send");
        let mut back = [0u8; 64];
        stream.read_exact(&mut back).expect("echo");
        rtt_us.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(back, message);
    }
    drop(stream);
    s.rtt_us.push(median(rtt_us));

    let stream = connect(&uds, PORT).expect("the guest accepts");
    let data = pattern(ECHO_BYTES, 9);
    let cpu_before = device_cpu_seconds(vmm, &vm);
    let started = Instant::now();
    let back = echo_through(stream, data.clone());
    let took = started.elapsed().as_secs_f64();
    let cpu = device_cpu_seconds(vmm, &vm) - cpu_before;
    assert!(back == data, "{}: the echo differs", vmm.name());
    let mib = (ECHO_BYTES >> 20) as f64;
    s.echo_mib_s.push(mib / took);
    // Each byte crossed the device twice.
    s.device_cpu_s_per_gib.push(cpu / (2.0 * mib / 1024.0));
    drop(vm.finish());
}

/// One boot with the guest sending to `<uds_path>_5000`.
fn guest_to_host_mib_s(vmm: &Vmm) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = UnixListener::bind(dir.path().join("v.sock_5000")).expect("listen");
    let vm = boot(
        vmm,
        dir.path(),
        &format!("probe.vsock_connect=5000:{SEND_BYTES} probe.vsock_timeout_ms=240000"),
        "probe.vsock=up",
    );
    let (mut stream, _) = listener.accept().expect("the guest connects");
    let started = Instant::now();
    let mut got = Vec::with_capacity(SEND_BYTES);
    stream.read_to_end(&mut got).expect("read");
    let took = started.elapsed().as_secs_f64();
    assert!(
        got.len() == SEND_BYTES && is_guest_pattern(&got),
        "{}: {} bytes, not the pattern",
        vmm.name(),
        got.len()
    );
    drop(vm.finish());
    (SEND_BYTES >> 20) as f64 / took
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}
