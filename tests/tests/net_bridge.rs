//! Two guests on one Linux bridge: two `tessera` instances, each with its
//! own `vhost-user-net` backend on its own TAP, both TAPs ports of `br0`
//! inside a network namespace of the test's own. The probe guests ping
//! each other (`probe.ping`), so the traffic goes guest -> backend -> TAP
//! -> bridge -> TAP -> backend -> guest both ways, with no host address
//! involved.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tessera_tests::netns::Netns;
use tessera_tests::{guest_artifacts, Running, VmConfig};

const DEADLINE: Duration = Duration::from_secs(120);
const IP_A: &str = "10.78.0.2";
const IP_B: &str = "10.78.0.3";
/// On the subnet, but no guest has it.
const IP_NOBODY: &str = "10.78.0.9";
const MAC_A: &str = "06:00:0a:4e:00:02";
const MAC_B: &str = "06:00:0a:4e:00:03";

/// Boots a probe guest inside `netns` with one interface on `tap`
/// (`host_dev_name`: tessera starts its backend), address `ip`/24, the
/// MAC `mac`, and `extra` on its command line. It serves the network for
/// 60 s after any ping, so the other guest's pings are answered.
fn boot_probe(
    netns: &Netns,
    dir: &Path,
    name: &str,
    tap: &str,
    ip: &str,
    mac: &str,
    extra: &str,
) -> Running {
    let mut config = VmConfig::new(
        guest_artifacts().probe(),
        &format!("console=ttyS0 probe.net={ip}/24 probe.net_serve_ms=60000 {extra}"),
    )
    .mem_mib(256)
    .to_json();
    config["network-interfaces"] =
        json!([{"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac}]);
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = netns.command(tessera_tests::workspace_bin("tessera").to_str().unwrap());
    command.arg("--no-api").arg("--config-file").arg(&path);
    Running::spawn(command)
}

/// Waits until `vm` printed a whole line starting with `prefix` (or exits,
/// or the deadline passes) and returns that line, if any.
fn wait_line(vm: &mut Running, prefix: &str) -> Option<String> {
    let find = |out: &str| {
        out.lines()
            .map(|l| l.trim_end_matches('\r'))
            .find(|l| l.starts_with(prefix))
            .map(str::to_string)
    };
    // Only complete lines: the text up to the last newline.
    let complete = |out: &str| {
        out.rsplit_once('\n')
            .map_or("", |(done, _)| done)
            .to_string()
    };
    vm.wait_until(DEADLINE, |out, _| find(&complete(out)).is_some());
    find(&complete(&vm.stdout()))
}

fn describe(vm: &Running) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        vm.stdout(),
        vm.stderr()
    )
}

#[test]
fn two_probes_on_a_bridge_ping_each_other() {
    let netns = Netns::with_bridge("bridge", &["tap0", "tap1"]);
    let dir = tempfile::tempdir().unwrap();
    // Both boot at once: each ARPs for the other until it is up.
    let mut a = boot_probe(
        &netns,
        dir.path(),
        "a",
        "tap0",
        IP_A,
        MAC_A,
        &format!("probe.ping={IP_B}"),
    );
    let mut b = boot_probe(
        &netns,
        dir.path(),
        "b",
        "tap1",
        IP_B,
        MAC_B,
        &format!("probe.ping={IP_A}"),
    );

    let line_a = wait_line(&mut a, &format!("probe.ping {IP_B} sent="));
    let line_b = wait_line(&mut b, &format!("probe.ping {IP_A} sent="));
    for (vm, mac) in [(&a, MAC_A), (&b, MAC_B)] {
        assert!(
            vm.stdout().contains(&format!("probe.net0=up mac={mac}")),
            "{}",
            describe(vm)
        );
    }
    assert_eq!(
        line_a.as_deref(),
        Some(format!("probe.ping {IP_B} sent=5 received=5").as_str()),
        "guest A\n{}",
        describe(&a)
    );
    assert_eq!(
        line_b.as_deref(),
        Some(format!("probe.ping {IP_A} sent=5 received=5").as_str()),
        "guest B\n{}",
        describe(&b)
    );
    for vm in [&a, &b] {
        assert!(!vm.stdout().contains("arp=timeout"), "{}", describe(vm));
    }
    // Both still run (serving), neither reset nor panicked.
    let (a, b) = (a.finish(), b.finish());
    assert!(a.status.is_none(), "guest A exited\n{}", a.describe());
    assert!(b.status.is_none(), "guest B exited\n{}", b.describe());
}

#[test]
fn a_ping_to_an_address_nobody_has_times_out_on_arp() {
    let netns = Netns::with_bridge("noarp", &["tap0", "tap1"]);
    let dir = tempfile::tempdir().unwrap();
    // B is on the bridge and serves, but answers ARP for its own address
    // only.
    let mut b = boot_probe(&netns, dir.path(), "b", "tap1", IP_B, MAC_B, "");
    assert!(
        wait_line(&mut b, "probe.net0=").is_some_and(|l| l.starts_with("probe.net0=up")),
        "{}",
        describe(&b)
    );
    let mut a = boot_probe(
        &netns,
        dir.path(),
        "a",
        "tap0",
        IP_A,
        MAC_A,
        &format!("probe.ping={IP_NOBODY}:3"),
    );
    let line = wait_line(&mut a, &format!("probe.ping {IP_NOBODY} sent="));
    let out = a.stdout();
    assert!(out.contains("probe.net0=up"), "{}", describe(&a));
    assert!(
        out.contains(&format!("probe.ping {IP_NOBODY} arp=timeout\n")),
        "{}",
        describe(&a)
    );
    assert_eq!(
        line.as_deref(),
        Some(format!("probe.ping {IP_NOBODY} sent=0 received=0").as_str()),
        "{}",
        describe(&a)
    );
    let a = a.finish();
    assert!(a.status.is_none(), "guest A exited\n{}", a.describe());
}
