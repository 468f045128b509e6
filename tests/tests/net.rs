//! Networking through `tessera` and our `vhost-user-net` backend, driven by
//! the probe guest's virtio-net driver: the host pings the guest through a
//! real TAP device inside a network namespace of the test's own, so no
//! traffic leaves the machine.

use std::time::Duration;

use serde_json::json;
use tessera_tests::api::{ApiClient, ApiVm};
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
    boot_probe_args(netns, dir, iface, "probe.net_serve_ms=100000")
}

/// As [`boot_probe_with`], with `args` on the probe's command line.
fn boot_probe_args(
    netns: &Netns,
    dir: &std::path::Path,
    iface: serde_json::Value,
    args: &str,
) -> Running {
    let mut config = VmConfig::new(
        guest_artifacts().probe(),
        &format!("console=ttyS0 probe.net={GUEST_IP}/24 {args}"),
    )
    .mem_mib(256)
    .to_json();
    config["network-interfaces"] = json!([iface]);
    config["metrics"] = json!({"metrics_path": dir.join("metrics.json")});
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = netns.command(tessera_tests::workspace_bin("tessera").to_str().unwrap());
    command
        .arg("--api-sock")
        .arg(dir.join("api.sock"))
        .arg("--config-file")
        .arg(&path);
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
    start_backend_with(netns, socket, &[])
}

/// As [`start_backend`], with `args` added.
fn start_backend_with(netns: &Netns, socket: &std::path::Path, args: &[&str]) -> Running {
    let mut command = netns.command(
        tessera_tests::workspace_bin("vhost-user-net")
            .to_str()
            .unwrap(),
    );
    command
        .arg("--socket")
        .arg(socket)
        .args(["--tap", "tap0"])
        .args(args);
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

/// Three pings, then `ping -f -c 10000`: all must come back. Returns the
/// flood's output.
fn ping_then_flood(netns: &Netns, vm: &Running) -> String {
    let out = ping(netns, &["-c", "3", "-W", "5"]);
    assert!(
        out.contains("3 packets transmitted, 3 received"),
        "{out}\n{}",
        vm.stderr()
    );
    let out = ping(netns, &["-f", "-c", "10000", "-W", "2"]);
    assert!(
        out.contains("10000 packets transmitted, 10000 received"),
        "{out}\n{}",
        vm.stderr()
    );
    out
}

#[test]
fn the_host_pings_the_probe_through_a_tap_and_a_flood_all_comes_back() {
    let netns = Netns::with_tap("ping", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let vm = boot_probe(&netns, dir.path());

    ping_then_flood(&netns, &vm);
    // The backend counted every frame both ways, and the VMM reports it.
    let mut api = tessera_tests::api::ApiClient::connect(&dir.path().join("api.sock"));
    let flushed = api.put("/actions", r#"{"action_type": "FlushMetrics"}"#);
    assert_eq!(flushed.status, 204, "{}", flushed.body);
    let metrics = std::fs::read_to_string(dir.path().join("metrics.json")).unwrap();
    let total = |counter: &str| -> u64 {
        metrics
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|line| line["net_eth0"][counter].as_u64())
            .sum()
    };
    // 10,003 echo requests in, as many replies out, 98 bytes each.
    for counter in ["rx_packets_count", "tx_packets_count"] {
        assert!(total(counter) >= 10_003, "{counter}: {metrics}");
    }
    for counter in ["rx_bytes_count", "tx_bytes_count"] {
        assert!(total(counter) >= 10_003 * 98, "{counter}: {metrics}");
    }
    for counter in ["tx_malformed_frames", "tap_write_fails", "event_fails"] {
        assert_eq!(total(counter), 0, "{counter}: {metrics}");
    }
    let run = vm.finish();
    assert!(run.stdout.contains("probe.net0=up"), "{}", run.describe());
}

#[test]
fn a_killed_backend_is_replaced_and_the_link_comes_back() {
    let netns = Netns::with_tap("kill", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot_probe(&netns, dir.path());
    let out = ping(&netns, &["-c", "1", "-W", "5"]);
    assert!(out.contains("1 received"), "{out}");
    let backend = tessera_tests::descendant_pid(vm.pid(), "vhost-user-net").expect("the backend");
    // SAFETY: kill sends a signal to a backend of the test's VMM.
    assert_eq!(unsafe { libc::kill(backend as i32, libc::SIGKILL) }, 0);
    let killed_at = std::time::Instant::now();
    let exited = vm.wait_until(DEADLINE, |_, err| {
        err.contains("interface eth0: a new backend took over")
    });
    assert!(!exited, "the VMM died with its backend\n{}", vm.stderr());
    let replacement =
        tessera_tests::descendant_pid(vm.pid(), "vhost-user-net").expect("a new backend");
    assert_ne!(replacement, backend);
    // Frames in flight at the kill may be lost; the link itself is back.
    let out = ping(&netns, &["-c", "3", "-i", "0.2", "-W", "5"]);
    assert!(
        out.contains("3 packets transmitted, 3 received"),
        "{out}\n{}",
        vm.stderr()
    );
    println!(
        "link back {} ms after the kill",
        killed_at.elapsed().as_millis()
    );
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
    let rc = unsafe { libc::kill(backend.pid() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
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

/// The frames each queue pair received, from the probe's verbose stats
/// (`probe.net0_pair=<p> rx=<n> tx=<n>`).
fn pair_rx_frames(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("probe.net0_pair="))
        .filter_map(|rest| {
            rest.split_once(" rx=")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Boots the probe with two queue pairs on a multi-queue `tap0` and
/// checks that it negotiated both (the VMM answered its VQ_PAIRS_SET on
/// the control queue).
fn boot_probe_two_pairs(netns: &Netns, dir: &std::path::Path, serve_ms: u32) -> Running {
    let iface = json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC,
                       "num_queue_pairs": 2});
    let vm = boot_probe_args(
        netns,
        dir,
        iface,
        &format!("probe.net_queues=2 probe.net_serve_ms={serve_ms} probe.verbose"),
    );
    assert!(
        vm.stdout()
            .contains(&format!("probe.net0=up mac={GUEST_MAC} queues=2")),
        "stdout:\n{}\nstderr:\n{}",
        vm.stdout(),
        vm.stderr()
    );
    assert!(
        vm.stderr()
            .contains("interface eth0: the guest uses 2 queue pair(s)"),
        "{}",
        vm.stderr()
    );
    vm
}

#[test]
fn two_queue_pairs_on_a_multi_queue_tap_and_a_flood_all_comes_back() {
    let netns = Netns::with_multi_queue_tap("mq", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let vm = boot_probe_two_pairs(&netns, dir.path(), 100_000);
    let out = ping_then_flood(&netns, &vm);
    eprintln!(
        "2 pairs, ping -f: {}",
        out.lines().last().unwrap_or_default()
    );
    let run = vm.finish();
    assert!(run.status.is_none(), "{}", run.describe());
}

/// Pings the guest 5 times from each of 16 source addresses at once and
/// asserts that every flow gets through. One flow stays on one TAP queue;
/// flows from 16 addresses are spread over all attached queues (by a hash
/// seeded at host boot: all 16 on one queue has a chance of 2^-15).
fn ping_from_sixteen_sources(netns: &Netns) {
    let sources: Vec<String> = (10..26).map(|i| format!("10.77.0.{i}")).collect();
    for source in &sources {
        netns.ip(&["addr", "add", &format!("{source}/24"), "dev", "tap0"]);
    }
    let pings: Vec<_> = sources
        .iter()
        .map(|source| {
            netns
                .command("ping")
                .args(["-c", "5", "-i", "0.05", "-W", "5", "-I", source, GUEST_IP])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("run ping")
        })
        .collect();
    // Sixteen flows at once lose an echo now and then in the probe, more
    // when the host is busy; every flow must get through, nearly all
    // echoes back.
    let mut received = 0;
    for ping in pings {
        let out = ping.wait_with_output().expect("wait for ping");
        let out = String::from_utf8_lossy(&out.stdout);
        let got = out
            .split_once("5 packets transmitted, ")
            .and_then(|(_, rest)| rest.split_once(" received"))
            .and_then(|(n, _)| n.parse::<u32>().ok())
            .unwrap_or(0);
        assert!(got >= 3, "{out}");
        received += got;
    }
    assert!(received >= 72, "{received} of 80 echoes came back");
}

#[test]
fn both_queue_pairs_carry_frames() {
    let netns = Netns::with_multi_queue_tap("mq2", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot_probe_two_pairs(&netns, dir.path(), 5_000);
    // Resolve the guest's address first: its first frames would wait in
    // a short ARP queue.
    let out = ping(&netns, &["-c", "1", "-W", "2"]);
    assert!(out.contains("1 received"), "{out}");
    ping_from_sixteen_sources(&netns);
    vm.wait_until(DEADLINE, |out, _| out.contains("probe.done"));
    let run = vm.finish();
    let rx = pair_rx_frames(&run.stdout);
    eprintln!("2 pairs, frames received per pair: {rx:?}");
    assert_eq!(rx.len(), 2, "{}", run.describe());
    assert!(rx.iter().all(|n| *n > 0), "{rx:?}\n{}", run.describe());
}

#[test]
fn a_guest_that_uses_one_of_two_pairs_gets_every_flow() {
    // The backend attaches a pair's TAP queue only once the guest uses the
    // pair; otherwise the TAP steers some flows to a queue no one reads.
    let netns = Netns::with_multi_queue_tap("mq1", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let iface = json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC,
                       "num_queue_pairs": 2});
    let mut vm = boot_probe_args(&netns, dir.path(), iface, "probe.net_serve_ms=5000");
    assert!(
        vm.stdout()
            .contains(&format!("probe.net0=up mac={GUEST_MAC} queues=1")),
        "{}",
        vm.stdout()
    );
    let out = ping(&netns, &["-c", "1", "-W", "2"]);
    assert!(out.contains("1 received"), "{out}");
    ping_from_sixteen_sources(&netns);
    vm.wait_until(DEADLINE, |out, _| out.contains("probe.done"));
    let run = vm.finish();
    assert!(run.stdout.contains("probe.done"), "{}", run.describe());
}

#[test]
fn an_external_backend_gives_the_pairs_it_serves_up_to_num_queue_pairs() {
    // A backend with two pairs: the guest gets both.
    let netns = Netns::with_multi_queue_tap("extmq", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let _backend = start_backend_with(&netns, &socket, &["--queues", "4"]);
    let iface = json!({"iface_id": "eth0", "socket": socket, "guest_mac": GUEST_MAC,
                       "num_queue_pairs": 2});
    let vm = boot_probe_args(
        &netns,
        dir.path(),
        iface,
        "probe.net_queues=2 probe.net_serve_ms=100000",
    );
    assert!(vm.stdout().contains("queues=2"), "{}", vm.stdout());
    let out = ping(&netns, &["-c", "3", "-W", "5"]);
    assert!(out.contains("3 received"), "{out}\n{}", vm.stderr());
    drop(vm);

    // A backend with one pair (no VIRTIO_NET_F_MQ): the guest gets one.
    let netns = Netns::with_tap("ext1q", "10.77.0.1/24");
    let socket = dir.path().join("net1.sock");
    let _backend = start_backend_with(&netns, &socket, &[]);
    let iface = json!({"iface_id": "eth0", "socket": socket, "guest_mac": GUEST_MAC,
                       "num_queue_pairs": 2});
    let vm = boot_probe_args(
        &netns,
        dir.path(),
        iface,
        "probe.net_queues=2 probe.net_serve_ms=100000",
    );
    assert!(vm.stdout().contains("queues=1"), "{}", vm.stdout());
    assert!(
        vm.stderr()
            .contains("2 queue pairs asked for, but the backend serves 2 queue(s) without"),
        "{}",
        vm.stderr()
    );
    let out = ping(&netns, &["-c", "3", "-W", "5"]);
    assert!(out.contains("3 received"), "{out}\n{}", vm.stderr());
}

#[test]
fn two_queue_pairs_need_a_multi_queue_tap() {
    let netns = Netns::with_tap("nomq", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let mut command = netns.command(tessera_tests::workspace_bin("tessera").to_str().unwrap());
    command.arg("--api-sock").arg(&socket);
    let _vm = Running::spawn(command);
    let mut api = ApiClient::connect(&socket);
    let body = json!({"iface_id": "eth0", "host_dev_name": "tap0", "num_queue_pairs": 2});
    let response = api.put("/network-interfaces/eth0", &body.to_string());
    assert_eq!(response.status, 400, "{}", response.body);
    let fault = response.fault();
    assert!(
        fault.contains("num_queue_pairs is 2 but TAP \"tap0\" is not multi-queue"),
        "{fault}"
    );
    // One pair on the same TAP is fine.
    let body = json!({"iface_id": "eth0", "host_dev_name": "tap0", "num_queue_pairs": 1});
    let response = api.put("/network-interfaces/eth0", &body.to_string());
    assert_eq!(response.status, 204, "{}", response.body);
}

#[test]
fn num_queue_pairs_must_be_between_1_and_8() {
    let vm = ApiVm::start(&[]);
    let mut api = vm.client();
    for pairs in [0, 9] {
        let body = json!({"iface_id": "eth0", "socket": "/nonexistent.sock",
                          "num_queue_pairs": pairs});
        let response = api.put("/network-interfaces/eth0", &body.to_string());
        assert_eq!(response.status, 400, "{}", response.body);
        assert_eq!(
            response.fault(),
            format!("interface \"eth0\": num_queue_pairs must be between 1 and 8, got {pairs}")
        );
    }
}

#[test]
fn a_snapshot_with_an_interface_loads_onto_another_tap_and_answers_pings() {
    let netns = Netns::with_tap("snap", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let iface = json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC});
    let mut vm = boot_probe_args(&netns, dir.path(), iface, "probe.ticks=0");
    let out = ping(&netns, &["-c", "3", "-W", "5"]);
    assert!(out.contains("3 packets transmitted, 3 received"), "{out}");
    let mut api = ApiClient::connect(&dir.path().join("api.sock"));
    assert_eq!(api.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    let r = api.put(
        "/snapshot/create",
        &json!({"snapshot_path": state, "mem_file_path": memory}).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    vm.wait_until(Duration::from_millis(200), |_, _| false);
    let before = vm.finish().stdout;
    // The clone gets another TAP, with the address the host side had.
    netns.ip(&["link", "del", "tap0"]);
    netns.ip(&["tuntap", "add", "dev", "tap1", "mode", "tap"]);
    netns.ip(&["addr", "add", "10.77.0.1/24", "dev", "tap1"]);
    netns.ip(&["link", "set", "tap1", "up"]);
    let socket = dir.path().join("clone.sock");
    let mut command = netns.command(tessera_tests::workspace_bin("tessera").to_str().unwrap());
    command.arg("--api-sock").arg(&socket);
    let mut clone = Running::spawn(command);
    let mut api = ApiClient::connect(&socket);
    let r = api.put(
        "/snapshot/load",
        &json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true,
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]})
        .to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    ping_then_flood(&netns, &clone);
    let config = api.get("/vm/config").json();
    assert_eq!(
        config["network-interfaces"][0]["host_dev_name"], "tap1",
        "{config}"
    );
    clone.wait_until(DEADLINE, |out, _| {
        out.split_once("probe.tick=")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    });
    let after = clone.finish().stdout;
    // Whole lines only: the harness may see the last in pieces.
    let last = |out: &str| {
        out.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| l.strip_prefix("probe.tick="))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .collect::<Vec<_>>()
    };
    let (before, after) = (last(&before), last(&after));
    assert_eq!(
        after.first().copied(),
        before.last().map(|n| n + 1),
        "ticks before: {before:?}, after: {after:?}"
    );
}

const CLONES: usize = 20;

/// The network namespace of clone `index`: its own TAP, `clone<index>`, at
/// the host address the snapshotted guest was talking to.
fn clone_netns(index: usize) -> Netns {
    let netns = Netns::new(&format!("clone{index}"));
    let tap = format!("clone{index}");
    netns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
    netns.ip(&["addr", "add", "10.77.0.1/24", "dev", &tap]);
    netns.ip(&["link", "set", &tap, "up"]);
    netns
}

#[test]
fn twenty_clones_of_one_snapshot_answer_pings_each_on_its_own_tap_and_disk() {
    let golden = Netns::with_tap("golden", "10.77.0.1/24");
    let dir = tempfile::tempdir().unwrap();
    let disk = tessera_tests::sparse_file(&dir.path().join("golden.img"), 1 << 20);
    let mut config = VmConfig::new(
        guest_artifacts().probe(),
        &format!("console=ttyS0 probe.net={GUEST_IP}/24 probe.ticks=0"),
    )
    .mem_mib(128)
    .to_json();
    config["network-interfaces"] =
        json!([{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC}]);
    config["drives"] = json!([{"drive_id": "data", "path_on_host": disk, "is_root_device": false}]);
    let path = dir.path().join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = golden.command(tessera_tests::workspace_bin("tessera").to_str().unwrap());
    command
        .arg("--api-sock")
        .arg(dir.path().join("api.sock"))
        .arg("--config-file")
        .arg(&path);
    let mut vm = Running::spawn(command);
    vm.wait_until(DEADLINE, |out, _| out.contains("probe.tick=2\n"));
    let out = ping(&golden, &["-c", "2", "-W", "5"]);
    assert!(out.contains("2 packets transmitted, 2 received"), "{out}");
    let mut api = ApiClient::connect(&dir.path().join("api.sock"));
    assert_eq!(api.patch("/vm", r#"{"state": "Paused"}"#).status, 204);
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    let r = api.put(
        "/snapshot/create",
        &json!({"snapshot_path": state, "mem_file_path": memory}).to_string(),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    drop(vm.finish());

    let clones: Vec<(Netns, Running, std::path::PathBuf)> = (0..CLONES)
        .map(|i| {
            let netns = clone_netns(i);
            let copy = dir.path().join(format!("clone{i}.img"));
            std::fs::copy(&disk, &copy).unwrap();
            let socket = dir.path().join(format!("clone{i}.sock"));
            let mut command =
                netns.command(tessera_tests::workspace_bin("tessera").to_str().unwrap());
            command.arg("--api-sock").arg(&socket);
            (netns, Running::spawn(command), copy)
        })
        .collect();
    std::thread::scope(|scope| {
        for (i, (_, _, copy)) in clones.iter().enumerate() {
            let socket = dir.path().join(format!("clone{i}.sock"));
            let body = json!({"snapshot_path": state, "mem_file_path": memory, "resume_vm": true,
                              "network_overrides": [{"iface_id": "eth0", "host_dev_name": format!("clone{i}")}],
                              "drive_overrides": [{"drive_id": "data", "path_on_host": copy}]});
            scope.spawn(move || {
                let r = ApiClient::connect(&socket).put("/snapshot/load", &body.to_string());
                assert_eq!(r.status, 204, "clone {i}: {}", r.body);
            });
        }
    });
    for (i, (netns, clone, copy)) in clones.into_iter().enumerate() {
        let out = ping(&netns, &["-c", "2", "-W", "5"]);
        assert!(
            out.contains("2 packets transmitted, 2 received"),
            "clone {i}: {out}\n{}",
            clone.stderr()
        );
        assert!(
            tessera_tests::descendant_pid(clone.pid(), "--serial data").is_some_and(|backend| {
                std::fs::read_dir(format!("/proc/{backend}/fd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == copy))
            }),
            "clone {i}'s drive is not served from {}",
            copy.display()
        );
        drop(clone.finish());
    }
}
