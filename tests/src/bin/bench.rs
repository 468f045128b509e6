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
//! Usage: tessera-bench [--runs N] [--out FILE]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::{
    guest_artifacts, probe_cmdline, run_with_deadline, tessera_command, Running, VmConfig,
};

const GUEST_RAM_MAPPING: &str = "tessera-guest-ram";

fn summary(mut samples: Vec<f64>) -> serde_json::Value {
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

/// (RSS, private) KiB of all mappings except guest RAM. Private memory is
/// what each additional VM really costs: shared library text is not in it.
fn overhead_kib(pid: u32) -> Option<(f64, f64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut rss, mut private) = (0u64, 0u64);
    let mut in_guest_ram = false;
    let kib = |rest: &str| {
        rest.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
    };
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_guest_ram = line.contains(GUEST_RAM_MAPPING);
        } else if in_guest_ram {
            continue;
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            rss += kib(rest)?;
        } else if let Some(rest) = line
            .strip_prefix("Private_Clean:")
            .or_else(|| line.strip_prefix("Private_Dirty:"))
        {
            private += kib(rest)?;
        }
    }
    Some((rss as f64, private as f64))
}

fn machine() -> serde_json::Value {
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

fn main() {
    let mut runs = 20usize;
    let mut out = String::from("bench-results.json");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--runs", Some(n)) => runs = n.parse().expect("--runs takes a number"),
            ("--out", Some(path)) => out = path,
            _ => panic!("usage: tessera-bench [--runs N] [--out FILE]"),
        }
    }
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
        let sample = (!exited).then(|| overhead_kib(vm.pid())).flatten();
        let run = vm.finish();
        let (rss, private_kib) =
            sample.unwrap_or_else(|| panic!("run {i}: no smaps sample\n{}", run.describe()));
        overhead.push(rss);
        private.push(private_kib);

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

    let report = json!({
        "machine": machine(),
        "runs": runs,
        "guest": "probe guest, 1 vCPU, 128 MiB",
        "boot_time_us": summary(boot_us),
        "boot_cpu_us": summary(boot_cpu_us),
        "vmm_overhead_kib": summary(overhead),
        "vmm_private_kib": summary(private),
        "host_spawn_us": summary(spawn_us),
    });
    let text = serde_json::to_string_pretty(&report).expect("json");
    std::fs::write(&out, &text).expect("write the results");
    println!("{text}");
}
