//! The benchmark harness: boots the probe guest under the release `tessera`
//! many times and writes the figures as JSON (see BENCHMARKS.md).
//!
//! Figures, each as minimum, median and maximum over `--runs` runs:
//! - `boot_time_us`: process start to the probe's boot-timer write, as the
//!   VMM's `Guest-boot-time` line reports it;
//! - `boot_cpu_us`: the VMM's CPU time over the same span;
//! - `vmm_overhead_kib`: the RSS of every mapping of the running VMM except
//!   guest RAM, from /proc/PID/smaps;
//! - `vmm_private_kib`: the private (not shared with other processes) part
//!   of that overhead;
//! - `host_spawn_us`: the host baseline, fork+exec+exit of `/bin/true`.
//!
//! With `--linux-guest DIR` it boots Linux from DIR instead and measures
//! `boot_time_us` and `guest_up_us` (process start to `TESSERA-GUEST-UP`);
//! with `--nested` it runs that inside L1 under QEMU TCG (see tests/nested);
//! `--block`, `--net`, `--net-dpdk` and `--net-frontend` measure the device
//! backends (see block.rs, net.rs, net_dpdk.rs, net_frontend.rs); `--startup`
//! start-up beside Firecracker and Cloud Hypervisor (startup.rs); `--snapshot`
//! snapshot create, load and clones beside Firecracker (snapshot.rs); `--vsock`
//! vsock beside them (vsock.rs); `--entropy` the entropy device and its
//! rate limiters beside Firecracker's (entropy.rs); `--drive-limits` a
//! drive's rate limiter beside Firecracker's (drive_limits.rs);
//! `--net-limits` an interface's (net_limits.rs); `--balloon`
//! the memory a balloon gives back beside Firecracker's (balloon.rs); `--pci`
//! and `--linux-pci DIR` (`--nested-pci`: inside L1) virtio-pci beside
//! virtio-mmio, beside Firecracker with and without `--enable-pci`
//! (pci.rs); `--fleet N`
//! the creation rate of N jailed microVMs beside Firecracker's (fleet.rs).
//!
//! Usage: tessera-bench [--linux-guest DIR | --nested | --nested-migration | --block | --net | --net-dpdk | --net-frontend | --jailer | --startup | --snapshot | --migration | --vsock | --entropy | --drive-limits | --net-limits | --mmds | --balloon | --pci | --linux-pci DIR | --nested-pci | --fleet N]
//!        [--runs N] [--out FILE]

mod balloon;
mod block;
mod boot_trace;
mod drive_limits;
mod entropy;
mod fleet;
mod jailer;
mod migration;
mod mmds;
mod net;
mod net_dpdk;
mod net_frontend;
mod net_limits;
mod pci;
mod peers;
mod snapshot;
mod startup;
mod vsock;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::api::ApiClient;
use tessera_tests::nested::{run_l1, L1_SILENCE};
use tessera_tests::{
    guest_artifacts, probe_cmdline, run_with_deadline, tessera_command, workspace_bin, Running,
    VmConfig,
};

pub(crate) const GUEST_RAM_MAPPING: &str = "tessera-guest-ram";

/// utime + stime of `pid`, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_cpu_seconds(&stat)
}

/// utime + stime from a `/proc/.../stat` line, in seconds.
pub(crate) fn stat_cpu_seconds(stat: &str) -> f64 {
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_this_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set is a valid mask; 0 is
    // the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

pub(crate) fn summary(mut samples: Vec<f64>) -> serde_json::Value {
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    json!({
        "min": samples.first(),
        "median": median,
        "max": samples.last(),
        "samples": samples,
    })
}

/// (wall us, CPU us) from the `Guest-boot-time` log line.
fn parse_boot_time(stderr: &str) -> Option<(f64, f64)> {
    let line = stderr.lines().find(|l| l.contains("Guest-boot-time = "))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let at = fields.iter().position(|f| *f == "Guest-boot-time")?;
    let wall = fields.get(at + 2)?.parse().ok()?;
    let cpu = fields.get(at + 6)?.parse().ok()?;
    Some((wall, cpu))
}

pub(crate) fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm"
    } else if std::path::Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel"
    } else {
        "kvm_amd"
    };
    json!({
        "cpu": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "host_kernel": kernel.trim(),
        "kvm": kvm,
    })
}

/// Where and what to measure.
enum Mode {
    /// The probe guest under this host's KVM.
    Probe,
    /// Linux from DIR (vmlinux, initramfs.cpio.gz) under this host's KVM.
    Linux(PathBuf),
    /// Linux under tessera inside an L1 under QEMU TCG (runs `Linux` there).
    Nested,
    /// `Migration` inside that L1, beside Cloud Hypervisor.
    NestedMigration,
    /// The block backend through libblkio, beside qemu-storage-daemon and fio.
    Block,
    /// ICMP echo through tessera and vhost-user-net, beside a host veth.
    Net,
    /// Frame rates through vhost-user-net with DPDK's virtio-user frontend.
    NetDpdk,
    /// Frame rates through vhost-user-net with our own vhost frontend.
    NetFrontend,
    /// The creation rate of N jailed microVMs, beside Firecracker's.
    Fleet(usize),
    /// The probe's boot time with and without the jailer.
    Jailer,
    /// Start-up figures beside Firecracker and Cloud Hypervisor.
    Startup,
    /// Snapshot create, load and clones beside Firecracker.
    Snapshot,
    /// Live migration beside Cloud Hypervisor.
    Migration,
    Vsock,
    Entropy,
    DriveLimits,
    Balloon,
    NetLimits,
    /// MMDS reads beside Firecracker.
    Mmds,
    /// The probe on virtio-pci beside virtio-mmio, beside Firecracker.
    Pci,
    /// Linux on virtio-pci beside virtio-mmio, beside Firecracker.
    LinuxPci(PathBuf),
    /// `LinuxPci` inside the nested harness's L1.
    NestedPci,
}

const USAGE: &str =
    "usage: tessera-bench [--linux-guest DIR | --nested | --nested-migration | --block | --net | --net-dpdk | --net-frontend | --jailer | --startup | --snapshot | --migration | --vsock | --entropy | --drive-limits | --net-limits | --mmds | --balloon | --pci | --linux-pci DIR | --nested-pci | --fleet N] [--runs N] [--out FILE]";

fn main() {
    let mut runs = 20usize;
    let mut out = String::from("bench-results.json");
    let mut mode = Mode::Probe;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nested" => mode = Mode::Nested,
            "--nested-migration" => mode = Mode::NestedMigration,
            "--block" => mode = Mode::Block,
            "--net" => mode = Mode::Net,
            "--net-dpdk" => mode = Mode::NetDpdk,
            "--net-frontend" => mode = Mode::NetFrontend,
            "--jailer" => mode = Mode::Jailer,
            "--startup" => mode = Mode::Startup,
            "--snapshot" => mode = Mode::Snapshot,
            "--migration" => mode = Mode::Migration,
            "--vsock" => mode = Mode::Vsock,
            "--entropy" => mode = Mode::Entropy,
            "--drive-limits" => mode = Mode::DriveLimits,
            "--balloon" => mode = Mode::Balloon,
            "--net-limits" => mode = Mode::NetLimits,
            "--mmds" => mode = Mode::Mmds,
            "--pci" => mode = Mode::Pci,
            "--nested-pci" => mode = Mode::NestedPci,
            "--linux-pci" => mode = Mode::LinuxPci(args.next().expect(USAGE).into()),
            "--fleet" => mode = Mode::Fleet(args.next().and_then(|n| n.parse().ok()).expect(USAGE)),
            "--linux-guest" => mode = Mode::Linux(args.next().expect(USAGE).into()),
            "--runs" => runs = args.next().and_then(|n| n.parse().ok()).expect(USAGE),
            "--out" => out = args.next().expect(USAGE),
            _ => panic!("{USAGE}"),
        }
    }
    let report = match mode {
        Mode::Probe => bench_probe(runs),
        Mode::Linux(dir) => bench_linux(&dir, runs),
        Mode::Nested => bench_nested(runs),
        Mode::NestedMigration => bench_nested_migration(),
        Mode::Block => block::bench_block(runs),
        Mode::Net => net::bench_net(runs),
        Mode::NetDpdk => net_dpdk::bench_net_dpdk(runs),
        Mode::NetFrontend => net_frontend::bench_net_frontend(runs),
        Mode::Jailer => jailer::bench_jailer(runs),
        Mode::Startup => startup::bench_startup(runs),
        Mode::Snapshot => snapshot::bench_snapshot(runs),
        Mode::Migration => migration::bench_migration(runs),
        Mode::Vsock => vsock::bench_vsock(runs),
        Mode::Entropy => entropy::bench_entropy(runs),
        Mode::DriveLimits => drive_limits::bench_drive_limits(runs),
        Mode::Balloon => balloon::bench_balloon(runs),
        Mode::NetLimits => net_limits::bench_net_limits(runs),
        Mode::Mmds => mmds::bench_mmds(runs),
        Mode::Pci => pci::bench_pci(runs),
        Mode::LinuxPci(dir) => pci::bench_linux_pci(&dir, runs),
        Mode::NestedPci => nested_scenario_report("bench_pci"),
        Mode::Fleet(count) => fleet::bench_fleet(runs, count),
    };
    let text = serde_json::to_string_pretty(&report).expect("json");
    std::fs::write(&out, &text).expect("write the results");
    println!("{text}");
}

fn bench_probe(runs: usize) -> serde_json::Value {
    let probe = guest_artifacts().probe();
    let dir = tempfile::tempdir().expect("tempdir");
    let deadline = Duration::from_secs(30);

    let (mut boot_us, mut boot_cpu_us, mut spawn_us) = (Vec::new(), Vec::new(), Vec::new());
    let (mut overhead, mut private) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let config = VmConfig::new(&probe, &probe_cmdline("")).mem_mib(128);
        let run = run_with_deadline(
            tessera_command(&config, dir.path(), &["--boot-timer"]),
            deadline,
            |_, _| false,
        );
        let (wall, cpu) = parse_boot_time(&run.stderr)
            .unwrap_or_else(|| panic!("run {i}: no boot time\n{}", run.describe()));
        boot_us.push(wall);
        boot_cpu_us.push(cpu);

        // Keep the guest alive (ticking) while smaps is read.
        let config = VmConfig::new(&probe, &probe_cmdline("probe.ticks=0")).mem_mib(128);
        let mut vm = Running::spawn(tessera_command(&config, dir.path(), &[]));
        let exited = vm.wait_until(deadline, |stdout, _| stdout.contains("probe.tick=2"));
        let sample = (!exited)
            .then(|| startup::overhead_kib(vm.pid(), 128))
            .flatten();
        let run = vm.finish();
        let sample =
            sample.unwrap_or_else(|| panic!("run {i}: no smaps sample\n{}", run.describe()));
        overhead.push(sample.rss);
        private.push(sample.private);

        let start = Instant::now();
        let status = Command::new("/bin/true").status().expect("spawn /bin/true");
        assert!(status.success());
        spawn_us.push(start.elapsed().as_secs_f64() * 1e6);
        eprintln!(
            "run {}/{runs}: boot {wall} us, overhead {} KiB",
            i + 1,
            overhead.last().unwrap()
        );
    }

    json!({
        "machine": machine(),
        "runs": runs,
        "guest": "probe guest, 1 vCPU, 128 MiB",
        "boot_time_us": summary(boot_us),
        "boot_cpu_us": summary(boot_cpu_us),
        "vmm_overhead_kib": summary(overhead),
        "vmm_private_kib": summary(private),
        "host_spawn_us": summary(spawn_us),
        "api": bench_api(runs),
    })
}

/// The API figures: process start until `GET /` answers (wall and the
/// VMM's CPU time), `InstanceStart` until the probe's boot-timer write, and
/// request latencies over one keep-alive connection, with a Unix-socket
/// round trip on the host as the baseline.
fn bench_api(runs: usize) -> serde_json::Value {
    const CALLS: usize = 1000;
    let probe = guest_artifacts().probe();
    let (mut ready_us, mut ready_cpu_us, mut start_to_timer_us) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut get_us, mut put_us) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.sock");
        let metrics_path = dir.path().join("metrics.json");
        let mut command = Command::new(workspace_bin("tessera"));
        command
            .arg("--api-sock")
            .arg(&socket)
            .arg("--metrics-path")
            .arg(&metrics_path)
            .arg("--boot-timer");
        let spawned = Instant::now();
        let mut vm = Running::spawn(command);
        let mut client = ApiClient::connect(&socket);
        assert_eq!(client.get("/").status, 200);
        ready_us.push(spawned.elapsed().as_secs_f64() * 1e6);

        if i == 0 {
            for _ in 0..CALLS {
                let t = Instant::now();
                assert_eq!(client.get("/").status, 200);
                get_us.push(t.elapsed().as_secs_f64() * 1e6);
                let t = Instant::now();
                let r = client.put(
                    "/machine-config",
                    r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
                );
                assert_eq!(r.status, 204);
                put_us.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }

        let boot = serde_json::json!({
            "kernel_image_path": probe,
            "boot_args": "console=ttyS0",
        });
        assert_eq!(client.put("/boot-source", &boot.to_string()).status, 204);
        let start_sent = spawned.elapsed().as_secs_f64() * 1e6;
        let r = client.put("/actions", r#"{"action_type": "InstanceStart"}"#);
        assert_eq!(r.status, 204, "{}", r.body);
        vm.wait_until(Duration::from_secs(30), |_, _| false);
        let run = vm.finish();
        let (wall, _) = parse_boot_time(&run.stderr)
            .unwrap_or_else(|| panic!("run {i}: no boot time\n{}", run.describe()));
        start_to_timer_us.push(wall - start_sent);

        let metrics = std::fs::read_to_string(&metrics_path).expect("metrics file");
        let line: serde_json::Value = metrics
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .expect("a metrics line");
        let cpu = line["api_server"]["process_startup_time_cpu_us"].as_f64();
        ready_cpu_us.push(cpu.expect("startup CPU time"));
    }

    // Host baseline: a request/response round trip over a Unix socket pair.
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 128];
        for _ in 0..CALLS {
            b.read_exact(&mut buf).expect("read");
            b.write_all(&buf).expect("write");
        }
    });
    let mut baseline_us = Vec::with_capacity(CALLS);
    let mut buf = [7u8; 128];
    for _ in 0..CALLS {
        let t = Instant::now();
        a.write_all(&buf).expect("write");
        a.read_exact(&mut buf).expect("read");
        baseline_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    echo.join().expect("echo thread");

    json!({
        "process_start_to_api_ready_us": summary(ready_us),
        "process_start_to_api_ready_cpu_us": summary(ready_cpu_us),
        "instance_start_to_boot_timer_us": summary(start_to_timer_us),
        "get_instance_info_latency_us": summary(get_us),
        "put_machine_config_latency_us": summary(put_us),
        "host_unix_socket_round_trip_us": summary(baseline_us),
        "latency_calls": CALLS,
    })
}

/// How long each stage of a benchmarked Linux boot (to the init's first
/// line, then to the VMM's exit) may take: both together well within the
/// nested harness's L1_SILENCE, so that a boot that hangs in L1 is
/// reported with its console and the VMM's log rather than looking like a
/// frozen L1.
const LINUX_BOOT_DEADLINE: Duration = Duration::from_secs(60);

/// The kernel command line of the Linux boot benchmark.
const LINUX_BENCH_ARGS: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off quiet tessera.boot_timer=1 tessera.halt=1";

/// Boots Linux (1 vCPU, 256 MiB, initramfs) `runs` times under tessera
/// and, when its binary is among the peers, under Firecracker, in turn:
/// process start to `TESSERA-GUEST-UP` (the init's first line), to the
/// process's exit (init halts at once), and, under tessera, to the init's
/// boot-timer write.
fn bench_linux(guest_dir: &Path, runs: usize) -> serde_json::Value {
    let config = VmConfig::new(guest_dir.join("vmlinux"), LINUX_BENCH_ARGS)
        .mem_mib(256)
        .initrd(guest_dir.join("initramfs.cpio.gz"));
    let mut vmms = vec![peers::Vmm::Tessera];
    vmms.extend(peers::peer_bin("firecracker").map(peers::Vmm::Firecracker));
    let mut per_vmm: Vec<LinuxBoots> = vmms.iter().map(|_| LinuxBoots::default()).collect();
    let (mut boot_us, mut boot_cpu_us) = (Vec::new(), Vec::new());
    for i in 0..runs {
        for k in 0..vmms.len() {
            let at = (i + k) % vmms.len();
            let vmm = &vmms[at];
            let dir = tempfile::tempdir().expect("tempdir");
            let mut command = vmm.boot_command(&config, dir.path());
            if let peers::Vmm::Tessera = vmm {
                command.arg("--boot-timer");
            }
            let mut vm = Running::spawn(command);
            vm.wait_until(LINUX_BOOT_DEADLINE, |stdout, _| {
                stdout.contains("TESSERA-GUEST-UP")
            });
            let marker = vm.elapsed();
            let exited = vm.wait_until(LINUX_BOOT_DEADLINE, |_, _| false);
            let end = vm.elapsed();
            let run = vm.finish();
            assert!(
                exited && run.stdout.contains("TESSERA-GUEST-UP"),
                "{} run {i}: Linux did not boot and halt\n{}",
                vmm.name(),
                run.describe()
            );
            let kernel_s = boot_trace::uptime_at_marker_s(&run.stdout)
                .unwrap_or_else(|| panic!("run {i}: no tessera.uptime\n{}", run.describe()));
            per_vmm[at].add(marker.as_secs_f64(), kernel_s, end.as_secs_f64());
            if let peers::Vmm::Tessera = vmm {
                let (wall, cpu) = parse_boot_time(&run.stderr)
                    .unwrap_or_else(|| panic!("run {i}: no boot time\n{}", run.describe()));
                boot_us.push(wall);
                boot_cpu_us.push(cpu);
            }
            eprintln!(
                "run {}/{runs}: {} exited after {:?}",
                i + 1,
                vmm.name(),
                end
            );
        }
    }
    let mut report = json!({
        "machine": machine(),
        "runs": runs,
        "guest": "Linux 6.1 (vmlinux, PVH), initramfs, 1 vCPU, 256 MiB, quiet",
        "boot_time_us": summary(boot_us),
        "boot_cpu_us": summary(boot_cpu_us),
    });
    for (vmm, boots) in vmms.iter().zip(per_vmm) {
        report[vmm.name()] = boots.report();
    }
    report["boot_trace"] = trace_boots(&vmms, guest_dir);
    if let Some(fc) = report.get("firecracker") {
        let median = |v: &serde_json::Value, k: &str| v[k]["median"].as_f64().unwrap_or(f64::NAN);
        let ours = &report["tessera"];
        let ratio = |k: &str| median(ours, k) / median(fc, k);
        report["tessera_over_firecracker"] = json!({
            "guest_up": ratio("guest_up_us"),
            "start_to_exit": ratio("start_to_exit_us"),
            "start_to_kernel": ratio("start_to_kernel_us"),
            "kernel_to_init": ratio("kernel_to_init_us"),
        });
    }
    report
}

/// One VMM's timed Linux boots, split where the guest kernel's clock
/// starts (the init prints the kernel's uptime at its first line).
#[derive(Default)]
struct LinuxBoots {
    guest_up_us: Vec<f64>,
    start_to_kernel_us: Vec<f64>,
    kernel_to_init_us: Vec<f64>,
    start_to_exit_us: Vec<f64>,
}

impl LinuxBoots {
    /// One boot: process start to the init's first line, the kernel's
    /// uptime there, and process start to exit (seconds).
    fn add(&mut self, up_s: f64, kernel_s: f64, exit_s: f64) {
        self.guest_up_us.push(up_s * 1e6);
        self.start_to_kernel_us.push((up_s - kernel_s) * 1e6);
        self.kernel_to_init_us.push(kernel_s * 1e6);
        self.start_to_exit_us.push(exit_s * 1e6);
    }

    fn report(self) -> serde_json::Value {
        json!({
            "guest_up_us": summary(self.guest_up_us),
            "start_to_kernel_us": summary(self.start_to_kernel_us),
            "kernel_to_init_us": summary(self.kernel_to_init_us),
            "start_to_exit_us": summary(self.start_to_exit_us),
        })
    }
}

/// One more boot under each VMM, with the kernel's initcall log read back:
/// where the boot time goes (see boot_trace.rs).
fn trace_boots(vmms: &[peers::Vmm], guest_dir: &Path) -> serde_json::Value {
    let args = format!("{LINUX_BENCH_ARGS} {}", boot_trace::TRACE_ARGS);
    let config = VmConfig::new(guest_dir.join("vmlinux"), &args)
        .mem_mib(256)
        .initrd(guest_dir.join("initramfs.cpio.gz"));
    let mut logs = Vec::new();
    let mut report = json!({"boot_args": args});
    for vmm in vmms {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut vm = Running::spawn(vmm.boot_command(&config, dir.path()));
        vm.wait_until(LINUX_BOOT_DEADLINE, |stdout, _| {
            stdout.contains("TESSERA-GUEST-UP")
        });
        // While the init prints the kernel log: how much of guest RAM the
        // host backs with transparent huge pages.
        let huge_kib = anon_huge_pages_kib(vm.pid());
        vm.wait_until(LINUX_BOOT_DEADLINE, |_, _| false);
        let run = vm.finish();
        // A timed benchmark without its breakdown is still worth keeping.
        let Some(log) = boot_trace::BootLog::parse(&run.stdout) else {
            let tail = &run.stdout[run
                .stdout
                .floor_char_boundary(run.stdout.len().saturating_sub(800))..];
            report[vmm.name()] = json!({"error": format!("no kernel log (status {:?}); the console ends: {tail}", run.status)});
            continue;
        };
        report[vmm.name()] = log.report();
        report[vmm.name()]["anon_huge_pages_kib_at_init"] = json!(huge_kib);
        logs.push(log);
    }
    if let [ours, theirs] = &logs[..] {
        report["initcall_differences_ms"] = boot_trace::initcall_differences(ours, theirs);
    }
    for setting in ["enabled", "defrag", "shmem_enabled"] {
        let path = format!("/sys/kernel/mm/transparent_hugepage/{setting}");
        report["host_thp"][setting] =
            json!(std::fs::read_to_string(path).unwrap_or_default().trim());
    }
    report
}

/// `AnonHugePages` of process `pid` (all its mappings), in KiB.
fn anon_huge_pages_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("AnonHugePages:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Runs `--migration` (128 MiB cells, 3 runs) inside L1 under QEMU TCG,
/// with Cloud Hypervisor beside tessera: L1's kvm-amd gives Cloud
/// Hypervisor the nested state this host's kvm_pvm refuses it.
fn bench_nested_migration() -> serde_json::Value {
    if peers::peer_bin("cloud-hypervisor").is_some() {
        std::env::set_var("TESSERA_NESTED_PEERS", peers::peers_dir());
    }
    let run = run_l1(&["migration_bench"], Duration::from_secs(1500), L1_SILENCE);
    let result = run.result("migration_bench").unwrap_or_else(|| {
        panic!(
            "L1 printed no migration_bench result\n{}",
            run.output.describe()
        )
    });
    let json_text = result
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("nested.migration_bench={result}"));
    let mut report: serde_json::Value = serde_json::from_str(json_text).expect("bench JSON");
    report["setup"] = json!(
        "nested: both VMMs inside an L1 Debian cloud kernel under QEMU TCG \
         (-cpu EPYC, 2 vCPUs, 2 GiB, emulated SVM); compare only with figures measured the same way"
    );
    report["host"] = machine();
    report
}

/// Runs `bench_linux` inside L1 under QEMU TCG and returns its report,
/// marked as nested.
fn bench_nested(runs: usize) -> serde_json::Value {
    if runs != 10 {
        eprintln!("the nested benchmark always makes 10 runs (tests/nested/runner.sh)");
    }
    nested_scenario_report("bench")
}

/// Runs the nested scenario `scenario` (a tessera-bench run inside L1,
/// beside Firecracker when `../shared/peers/` has it) and returns the JSON
/// report it printed.
fn nested_scenario_report(scenario: &str) -> serde_json::Value {
    if peers::peer_bin("firecracker").is_some() {
        // build-l1.sh then puts Firecracker in L1, to boot beside tessera.
        std::env::set_var("TESSERA_NESTED_PEERS", peers::peers_dir());
    }
    // The bench prints a line per boot: an L1 silent for L1_SILENCE froze
    // (TCG's emulated SVM does, now and then), and gets one more try.
    let deadline = Duration::from_secs(900);
    let mut run = run_l1(&[scenario], deadline, L1_SILENCE);
    if run.result(scenario).is_none() && !run.finished() {
        eprintln!(
            "nested: L1 stopped before the bench ended; once more\n{}",
            run.output.describe()
        );
        run = run_l1(&[scenario], deadline, L1_SILENCE);
    }
    let result = run
        .result(scenario)
        .unwrap_or_else(|| panic!("L1 printed no {scenario} result\n{}", run.output.describe()));
    let json_text = result
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("nested.{scenario}={result}\n{}", run.output.describe()));
    let mut report: serde_json::Value = serde_json::from_str(json_text).expect("bench JSON");
    report["setup"] = json!(
        "nested: L2 under tessera inside an L1 Debian cloud kernel under QEMU TCG \
         (-cpu EPYC, 2 vCPUs, 2 GiB, emulated SVM); compare only with figures measured the same way"
    );
    report["host"] = machine();
    report
}
