//! Soak: 50 jailed microVMs at once on this machine, each the probe guest
//! with a drive and a TAP served by jailed backends, all ticking; then each
//! VMM is killed with SIGKILL, as an orchestrator tears a fleet down. Once
//! they are gone nothing may be left behind: no process, no fd in this
//! process, no backend jail, no cgroup, no socket, no TAP still attached.
//! The creation rate (jailer start to the probe's first tick, all 50
//! started back to back) is printed for the record; the bench compares it
//! with Firecracker's.
//!
//! `TESSERA_SOAK_VMS` sets the fleet size (default 50). Needs root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tessera_tests::jail::{jailer_command, unique_id, v1_mount, JailBase};
use tessera_tests::netns::Netns;
use tessera_tests::{fleet, workspace_bin, Running};

const DEADLINE: Duration = Duration::from_secs(240);
/// The cgroup v1 controllers the jailer gets values for.
const CONTROLLERS: [&str; 2] = ["cpuset", "cpu"];
/// Executables of the fleet, as `/proc/<pid>/comm` shows them (at most 15
/// bytes).
const FLEET_COMMS: [&str; 4] = ["tessera", "jailer", "vhost-user-blk", "vhost-user-net"];

fn is_root() -> bool {
    tessera_tests::jail::status_field(std::process::id(), "Uid")
        .is_some_and(|uid| uid.starts_with("0 "))
}

/// Every process and its parent.
fn process_parents() -> Vec<(u32, u32)> {
    let mut pairs = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse().ok());
        if let Some(ppid) = ppid {
            pairs.push((pid, ppid));
        }
    }
    pairs
}

/// `roots` and all their descendants.
fn process_tree(roots: &[u32]) -> BTreeSet<u32> {
    let parents = process_parents();
    let mut tree: BTreeSet<u32> = roots.iter().copied().collect();
    loop {
        let before = tree.len();
        for (pid, ppid) in &parents {
            if tree.contains(ppid) {
                tree.insert(*pid);
            }
        }
        if tree.len() == before {
            return tree;
        }
    }
}

/// Which of `pids` still run as one of the fleet's executables.
fn still_running(pids: &BTreeSet<u32>) -> Vec<(u32, String)> {
    pids.iter()
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            FLEET_COMMS
                .contains(&comm.trim())
                .then(|| (*pid, comm.trim().to_string()))
        })
        .collect()
}

fn open_fds() -> BTreeSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|target| target.display().to_string())
        .collect()
}

/// Every directory under the parent cgroup, in every controller.
fn cgroups_under(parent: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for controller in CONTROLLERS {
        let Some(mount) = v1_mount(controller) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(mount.join(parent)) else {
            continue;
        };
        found.extend(
            entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.path()),
        );
    }
    found
}

/// Everything under the chroot base but the VMMs' own jail roots (the
/// orchestrator's to remove, as with Firecracker's): backend jails, at
/// `<base>/tessera/<id>/<backend>/<device>` or anywhere else.
fn jails_under(base: &Path) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for exe in std::fs::read_dir(base).into_iter().flatten().flatten() {
        for instance in std::fs::read_dir(exe.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if exe.file_name() != "tessera" {
                left.push(instance.path());
                continue;
            }
            left.extend(
                std::fs::read_dir(instance.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|entry| entry.file_name() != "root")
                    .map(|entry| entry.path()),
            );
        }
    }
    left
}

/// A TAP has carrier while some process has a queue attached.
fn tap_attached(netns: &Netns, tap: &str) -> bool {
    let out = netns
        .command("cat")
        .arg(format!("/sys/class/net/{tap}/carrier"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "1"
}

struct Vm {
    id: String,
    tap: String,
    running: Running,
}

fn start_vm(base: &JailBase, netns: &Netns, parent: &str, index: usize) -> Vm {
    let id = unique_id("soak");
    let tap = format!("tap{index}");
    fleet::prepare_vm(
        base,
        "tessera",
        &id,
        &fleet::probe_args(index, "10.82"),
        &tap,
        &fleet::mac(index),
    );
    let backend_uid = fleet::BACKEND_UID.to_string();
    let extra = [
        "--parent-cgroup",
        parent,
        "--cgroup",
        "cpu.shares=512",
        "--backend-uid",
        &backend_uid,
        "--backend-gid",
        &backend_uid,
    ];
    let args = fleet::jailer_args(
        base.path(),
        &id,
        &workspace_bin("tessera"),
        &netns.path(),
        &extra,
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let running = Running::spawn(jailer_command(&args));
    Vm { id, tap, running }
}

#[test]
fn fifty_jailed_microvms_tick_together_and_leave_nothing_behind() {
    if !tessera_tests::can_run(is_root(), "the soak test needs root") {
        return;
    }
    let count: usize = std::env::var("TESSERA_SOAK_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let netns = Netns::with_tap_fleet("soak", count, fleet::VMM_UID, "10.82");
    let base = JailBase::new();
    let parent = unique_id("tessera-soak");
    let fds_before = open_fds();

    let start = Instant::now();
    let mut vms: Vec<Vm> = (0..count)
        .map(|index| start_vm(&base, &netns, &parent, index))
        .collect();
    for vm in &mut vms {
        vm.running.wait_until(DEADLINE, |out, _| {
            tessera_tests::has_line(out, "probe.cmdline")
        });
    }
    let all_booted = start.elapsed();
    for vm in &mut vms {
        let exited = vm.running.wait_until(DEADLINE, |out, _| {
            tessera_tests::has_line(out, "probe.tick=1")
        });
        assert!(
            !exited && vm.running.stdout().contains("probe.tick=1"),
            "{} did not tick:\n{}\n{}",
            vm.id,
            vm.running.stdout(),
            vm.running.stderr()
        );
    }
    let all_ticking = start.elapsed();
    eprintln!(
        "{count} jailed microVMs (drive + TAP, jailed backends), started back to back: all \
         booted (probe.cmdline) {all_booted:?} after the first jailer start ({:.1} microVMs/s), \
         all ticking after {all_ticking:?}",
        count as f64 / all_booted.as_secs_f64()
    );
    for vm in &vms {
        let out = vm.running.stdout();
        assert!(
            out.contains("probe.blk0=ok") && out.contains("probe.net0=up"),
            "{}:\n{out}",
            vm.id
        );
        assert!(tap_attached(&netns, &vm.tap), "{} is not attached", vm.tap);
    }
    let ping = netns
        .command("ping")
        .args([
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            &format!("10.82.{}.2", count - 1),
        ])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let fleet = process_tree(&vms.iter().map(|vm| vm.running.pid()).collect::<Vec<_>>());
    assert!(
        fleet.len() >= count * 4,
        "expected a VMM, a launcher and two backends per microVM, found {} processes",
        fleet.len()
    );

    // Tear the fleet down the hard way.
    for vm in &vms {
        // SAFETY: SIGKILL to a VMM this test started.
        unsafe { libc::kill(vm.running.pid() as i32, libc::SIGKILL) };
    }
    let ids: Vec<String> = vms.iter().map(|vm| vm.id.clone()).collect();
    for mut vm in vms.drain(..) {
        let deadline = vm.running.elapsed() + Duration::from_secs(10);
        assert!(
            vm.running.wait_until(deadline, |_, _| false),
            "{} outlived SIGKILL by 10 s",
            vm.id
        );
        vm.running.finish();
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let leftovers = loop {
        let processes = still_running(&fleet);
        let cgroups = cgroups_under(&parent);
        let files = jails_under(base.path());
        let taps: Vec<String> = (0..count)
            .map(|i| format!("tap{i}"))
            .filter(|tap| tap_attached(&netns, tap))
            .collect();
        let done =
            processes.is_empty() && cgroups.is_empty() && files.is_empty() && taps.is_empty();
        if done || Instant::now() > deadline {
            break (processes, cgroups, files, taps);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let fds_after = open_fds();
    // The VMMs' own jails are the orchestrator's to remove.
    for id in &ids {
        let _ = std::fs::remove_dir_all(base.root("tessera", id).parent().unwrap());
    }
    for controller in CONTROLLERS {
        if let Some(mount) = v1_mount(controller) {
            let _ = std::fs::remove_dir(mount.join(&parent));
        }
    }
    let (processes, cgroups, files, taps) = leftovers;
    assert!(processes.is_empty(), "processes left: {processes:?}");
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    assert!(files.is_empty(), "jails left: {files:?}");
    assert!(taps.is_empty(), "TAPs still attached: {taps:?}");
    assert_eq!(
        fds_after.difference(&fds_before).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "fds left open in the test process"
    );
}
