//! Boot time with and without the jailer: the probe guest from
//! `--config-file`, `tessera` started directly or by `jailer` (its own
//! chroot copy, mount namespace, a cgroup, uid 1234, seccomp in both).
//! Under the jailer, tessera counts boot time from the jailer's start
//! (`--start-time-us`), as Firecracker does.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tessera_tests::jail::{jailer_command, remove_parent_cgroups, unique_id, JailBase};
use tessera_tests::{guest_artifacts, probe_cmdline, run_with_deadline, tessera_command, VmConfig};

use crate::{machine, parse_boot_time, summary};

const DEADLINE: Duration = Duration::from_secs(30);

pub fn bench_jailer(runs: usize) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = JailBase::new();
    let parent = unique_id("tessera-bench");
    let (mut direct_us, mut jailed_us) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let config = VmConfig::new(guest_artifacts().probe(), &probe_cmdline("")).mem_mib(128);
        let run = run_with_deadline(
            tessera_command(&config, dir.path(), &["--boot-timer"]),
            DEADLINE,
            |_, _| false,
        );
        let (direct, _) = parse_boot_time(&run.stderr)
            .unwrap_or_else(|| panic!("run {i}: no boot time\n{}", run.describe()));

        let id = unique_id("bench");
        base.prepare_probe(&id, &probe_cmdline(""));
        let tessera = tessera_tests::workspace_bin("tessera");
        let args = [
            "--id",
            &id,
            "--exec-file",
            tessera.to_str().expect("utf-8 path"),
            "--uid",
            "1234",
            "--gid",
            "1234",
            "--chroot-base-dir",
            base.path().to_str().expect("utf-8 path"),
            "--parent-cgroup",
            &parent,
            "--cgroup",
            "cpu.shares=1024",
            "--",
            "--no-api",
            "--config-file",
            "vm.json",
            "--boot-timer",
        ];
        let run = run_with_deadline(jailer_command(&args), DEADLINE, |_, _| false);
        let (jailed, _) = parse_boot_time(&run.stderr)
            .unwrap_or_else(|| panic!("jailed run {i}: no boot time\n{}", run.describe()));
        eprintln!(
            "run {}/{runs}: direct {direct} us, jailed {jailed} us",
            i + 1
        );
        direct_us.push(direct);
        jailed_us.push(jailed);
        // Each run's jail holds a copy of tessera and its libraries.
        let _ = Command::new("rm")
            .arg("-rf")
            .arg(base.path().join("tessera").join(&id))
            .status();
    }
    std::thread::sleep(Duration::from_millis(200));
    remove_parent_cgroups(&["cpu"], &parent);
    json!({
        "machine": machine(),
        "runs": runs,
        "guest": "probe guest, 1 vCPU, 128 MiB, --config-file",
        "boot_time_direct_us": summary(direct_us),
        "boot_time_jailed_us": summary(jailed_us),
    })
}
