//! Networking through `tessera` and our `vhost-user-net` backend, driven by
//! the probe guest's virtio-net driver: the host pings the guest through a
//! real TAP device inside a network namespace of the test's own, so no
//! traffic leaves the machine.

use std::time::Duration;

use serde_json::json;
use tessera_tests::netns::Netns;
use tessera_tests::{guest_artifacts, Running, VmConfig};

const DEADLINE: Duration = Duration::from_secs(120);
const GUEST_IP: &str = "10.77.0.2";
const GUEST_MAC: &str = "06:00:0a:4d:00:02";

/// Boots the probe with one interface on `tap0` inside `netns` and waits
/// until its driver is up.
fn boot_probe(netns: &Netns, dir: &std::path::Path) -> Running {
    let iface = json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC});
    boot_probe_with(netns, dir, iface)
}

/// Boots the probe with the interface `iface` and waits until its driver
/// is up with `GUEST_MAC`.
fn boot_probe_with(netns: &Netns, dir: &std::path::Path, iface: serde_json::Value) -> Running {
    let mut config = VmConfig::new(
        guest_artifacts().probe(),
        &format!("console=ttyS0 probe.net={GUEST_IP}/24 probe.net_serve_ms=100000"),
    )
    .mem_mib(256)
    .to_json();
    config["network-interfaces"] = json!([iface]);
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = netns.command(tessera_tests::workspace_bin("tessera").to_str().unwrap());
    command.arg("--no-api").arg("--config-file").arg(&path);
    let mut vm = Running::spawn(command);
    vm.wait_until(DEADLINE, |out, _| {
        out.split_once("probe.net0=")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    });
    assert!(
        vm.stdout()
            .contains(&format!("probe.net0=up mac={GUEST_MAC}")),
        "stdout:\n{}\nstderr:\n{}",
        vm.stdout(),
        vm.stderr()
    );
    vm
}

/// Starts an external `vhost-user-net` on `tap0` (without `--mac`) and
/// waits until it listens on `socket`.
fn start_backend(netns: &Netns, socket: &std::path::Path) -> Running {
    let mut command = netns.command(
        tessera_tests::workspace_bin("vhost-user-net")
            .to_str()
            .unwrap(),
    );
    command.arg("--socket").arg(socket).args(["--tap", "tap0"]);
    let backend = Running::spawn(command);
    assert!(
        tessera_tests::wait_for_path(socket, DEADLINE),
        "{}",
        backend.stderr()
    );
    backend
}

fn ping(netns: &Netns, args: &[&str]) -> String {
    let out = netns
        .command("ping")
        .args(args)
        .arg(GUEST_IP)
        .output()
        .expect("run ping");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_host_pings_the_probe_through_a_tap_and_a_flood_all_comes_back() {
    let netns = Netns::with_tap("ping", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let vm = boot_probe(&netns, dir.path());

    let out = ping(&netns, &["-c", "3", "-W", "5"]);
    assert!(
        out.contains("3 packets transmitted, 3 received"),
        "{out}\n{}",
        vm.stderr()
    );
    let out = ping(&netns, &["-f", "-c", "10000", "-W", "2"]);
    assert!(
        out.contains("10000 packets transmitted, 10000 received"),
        "{out}\n{}",
        vm.stderr()
    );
    let run = vm.finish();
    assert!(run.stdout.contains("probe.net0=up"), "{}", run.describe());
}

#[test]
fn a_killed_backend_leaves_the_vmm_and_the_guest_alive() {
    let netns = Netns::with_tap("kill", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot_probe(&netns, dir.path());
    let out = ping(&netns, &["-c", "1", "-W", "5"]);
    assert!(out.contains("1 received"), "{out}");

    let backend = tessera_tests::child_pid(vm.pid(), "vhost-user-net").expect("the backend");
    // SAFETY: kill sends a signal to a child process of the test's VMM.
    assert_eq!(unsafe { libc::kill(backend as i32, libc::SIGKILL) }, 0);
    let exited = vm.wait_until(DEADLINE, |_, err| {
        err.contains("interface eth0: the backend is gone")
    });
    assert!(!exited, "the VMM died with its backend\n{}", vm.stderr());
    let out = ping(&netns, &["-c", "1", "-W", "1"]);
    assert!(out.contains("0 received"), "{out}");
    // The guest still runs: its serial console still answers the VMM.
    std::thread::sleep(Duration::from_millis(500));
    let run = vm.finish();
    assert!(run.status.is_none(), "{}", run.describe());
}

#[test]
fn the_backend_exits_cleanly_on_sigterm() {
    let netns = Netns::with_tap("term", "10.77.1.1/24");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let mut backend = start_backend(&netns, &socket);
    // `ip netns exec` execs the backend: the pid is the backend's.
    // SAFETY: kill sends a signal to a process this test started.
    assert_eq!(
        unsafe { libc::kill(backend.pid() as i32, libc::SIGTERM) },
        0
    );
    assert!(backend.wait_until(DEADLINE, |_, _| false));
    let run = backend.finish();
    assert_eq!(run.code(), 0, "{}", run.describe());
    assert!(
        run.stderr.contains("SIGTERM: exiting"),
        "{}",
        run.describe()
    );
}

#[test]
fn an_external_backend_serves_the_guest_with_the_configured_mac() {
    let netns = Netns::with_tap("ext", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    // No --mac: the address the guest sees comes from the VMM's guest_mac.
    let _backend = start_backend(&netns, &socket);
    let iface = json!({"iface_id": "eth0", "socket": socket, "guest_mac": GUEST_MAC});
    let vm = boot_probe_with(&netns, dir.path(), iface);
    let out = ping(&netns, &["-c", "3", "-W", "5"]);
    assert!(
        out.contains("3 packets transmitted, 3 received"),
        "{out}\n{}",
        vm.stderr()
    );
}
