//! Fleet creation rate: `--fleet N` starts N microVMs back to back, each
//! the probe guest with a drive and an interface on a TAP of its own,
//! through a jailer, and times them until every guest has booted (printed
//! its command line). Tessera (its jailer, with jailed backends) and
//! Firecracker (`../shared/peers/firecracker` and `firecracker-jailer`,
//! in-process devices) run alternately in the same bench, the same probe,
//! the same jail layout, uid, netns and TAPs. Without the peer binaries
//! only Tessera is measured, and the report says so. The peer build is
//! dynamically linked and Firecracker's jailer copies only the binary, so
//! the bench copies its loader and libraries into each jail (inside the
//! timed span; Tessera's jailer does the same copy itself).
//!
//! Figures per VMM: `fleet_rate_vms_per_s` (N over the time from the first
//! jailer start to the last guest's boot line), and `vm_boot_ms` (each
//! VM's jailer start to its boot line, all runs pooled).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::fleet;
use tessera_tests::jail::{unique_id, JailBase};
use tessera_tests::netns::Netns;
use tessera_tests::{workspace_bin, Running};

use crate::{machine, summary};

const BOOT_DEADLINE: Duration = Duration::from_secs(120);

/// One VMM under test: its jailer, its exec file and extra jailer flags.
struct Contender {
    name: &'static str,
    jailer: PathBuf,
    exec_file: PathBuf,
    /// The directory the jailer names after the exec file.
    exe_dir: &'static str,
    extra: Vec<String>,
    /// Shared libraries to put in each jail first: Firecracker's jailer
    /// expects a static binary, and the peer build is dynamically linked.
    libraries: Vec<PathBuf>,
}

/// The loader and libraries `ldd` lists for `binary`.
fn shared_libraries(binary: &std::path::Path) -> Vec<PathBuf> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .expect("run ldd");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

fn contenders() -> (Vec<Contender>, Option<String>) {
    let backend_uid = fleet::BACKEND_UID.to_string();
    let tessera = Contender {
        name: "tessera",
        jailer: workspace_bin("jailer"),
        exec_file: workspace_bin("tessera"),
        exe_dir: "tessera",
        extra: ["--backend-uid", &backend_uid, "--backend-gid", &backend_uid]
            .map(String::from)
            .to_vec(),
        libraries: Vec::new(),
    };
    let peers = crate::peers::peers_dir();
    let (firecracker, jailer) = (peers.join("firecracker"), peers.join("firecracker-jailer"));
    if !firecracker.exists() || !jailer.exists() {
        let why = format!("Firecracker not measured: no {}", peers.display());
        eprintln!("{why}");
        return (vec![tessera], Some(why));
    }
    let firecracker = Contender {
        name: "firecracker",
        jailer,
        libraries: shared_libraries(&firecracker),
        exec_file: firecracker,
        exe_dir: "firecracker",
        extra: Vec::new(),
    };
    (vec![tessera, firecracker], None)
}

/// Starts the fleet; returns the fleet time and each VM's boot time.
fn run_fleet(contender: &Contender, count: usize) -> (Duration, Vec<Duration>) {
    let netns = Netns::with_tap_fleet("fleet", count, fleet::VMM_UID, "10.83");
    let base = JailBase::new();
    let mut vms = Vec::with_capacity(count);
    let first = Instant::now();
    for index in 0..count {
        let id = unique_id("fleet");
        let root = fleet::prepare_vm(
            &base,
            contender.exe_dir,
            &id,
            &fleet::probe_args(index, "10.83"),
            &format!("tap{index}"),
            &fleet::mac(index),
        );
        for library in &contender.libraries {
            let to = root.join(library.strip_prefix("/").expect("absolute path"));
            std::fs::create_dir_all(to.parent().expect("a parent")).expect("library directory");
            std::fs::copy(library, &to).expect("copy a library into the jail");
        }
        let extra: Vec<&str> = contender.extra.iter().map(String::as_str).collect();
        let args = fleet::jailer_args(
            base.path(),
            &id,
            &contender.exec_file,
            &netns.path(),
            &extra,
        );
        let mut command = std::process::Command::new(&contender.jailer);
        command.args(&args);
        vms.push((Instant::now(), Running::spawn(command), None::<Duration>));
    }
    while vms.iter().any(|(_, _, booted)| booted.is_none()) {
        assert!(
            first.elapsed() < BOOT_DEADLINE,
            "{}: not every guest booted in {BOOT_DEADLINE:?}",
            contender.name
        );
        for (started, vm, booted) in &mut vms {
            if booted.is_none() && vm.stdout().contains("probe.cmdline=") {
                *booted = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let fleet_time = first.elapsed();
    let boots = vms.iter().filter_map(|(_, _, booted)| *booted).collect();
    for (_, vm, _) in &vms {
        // SAFETY: SIGKILL to a VMM this bench started.
        unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) };
    }
    for (_, vm, _) in vms {
        vm.finish();
    }
    (fleet_time, boots)
}

pub fn bench_fleet(runs: usize, count: usize) -> serde_json::Value {
    let (contenders, missing_peer) = contenders();
    let mut rates = vec![Vec::new(); contenders.len()];
    let mut boots = vec![Vec::new(); contenders.len()];
    for run in 0..runs {
        for (i, contender) in contenders.iter().enumerate() {
            let (fleet_time, vm_boots) = run_fleet(contender, count);
            let rate = count as f64 / fleet_time.as_secs_f64();
            eprintln!(
                "run {}/{runs} {}: {count} microVMs booted in {fleet_time:?}: {rate:.1}/s",
                run + 1,
                contender.name
            );
            rates[i].push(rate);
            boots[i].extend(vm_boots.iter().map(|d| d.as_secs_f64() * 1e3));
        }
    }
    let per_vmm: serde_json::Map<String, serde_json::Value> = contenders
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                c.name.to_string(),
                json!({
                    "fleet_rate_vms_per_s": summary(rates[i].clone()),
                    "vm_boot_ms": summary(boots[i].clone()),
                }),
            )
        })
        .collect();
    json!({
        "machine": machine(),
        "runs": runs,
        "microvms_per_run": count,
        "guest": "probe guest, 1 vCPU, 128 MiB, a 4 MiB drive and a TAP each, through the jailer (uid 1234, own netns), started back to back",
        "missing_peer": missing_peer,
        "vmms": per_vmm,
    })
}
